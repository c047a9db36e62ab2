//! `evmesh schema register|check|list|show|diff`, and the payload codec that turns JSON
//! into payloads and payloads into JSON through registered schemas.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use evmesh_client::Transport;
use evmesh_proto::v1 as pb;
use evmesh_proto::v1::schema_registry_client::SchemaRegistryClient;
use evmesh_schema::Schema;
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Value, json};

use crate::commands::{NodeArg, all_pages, channel, rpc};
use crate::output;

#[derive(clap::Args)]
pub(crate) struct SchemaArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    #[command(subcommand)]
    command: SchemaCommand,
}

#[derive(clap::Subcommand)]
pub(crate) enum SchemaCommand {
    /// Compile .proto files and register the payload schema of an event type.
    Register(ProtoArgs),
    /// Dry run of register: the verdict, and the version it would get.
    Check(ProtoArgs),
    /// Registered versions, of one type or all.
    List {
        /// Only the versions of this event type.
        #[arg(long = "type")]
        ty: Option<String>,
        /// text: a table; json: one JSON line per version.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// One registered version (the latest by default).
    Show {
        /// The event type, e.g. shop.order.placed.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The version to show; the latest when left out.
        #[arg(long)]
        version: Option<String>,
        /// text: the payload message and what it reaches, proto-like; json: one
        /// object; proto: the version's files as .proto source, the payload's first.
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        output: ShowFormat,
    },
    /// The changes between two registered versions, with the checker's verdict.
    Diff {
        /// The event type, e.g. shop.order.placed.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The older version.
        from: String,
        /// The newer version.
        to: String,
        /// text: a line and a table of changes; json: one object.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ShowFormat {
    Text,
    Json,
    Proto,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
pub(crate) struct ProtoArgs {
    /// The .proto files: paths under an include directory (-I), or names relative
    /// to one.
    #[arg(required = true, value_name = "FILE.proto")]
    files: Vec<PathBuf>,
    /// Include directories for imports; default: the current directory.
    /// `evmesh/v1/options.proto` is always found: the CLI carries it.
    #[arg(short = 'I', long = "include", value_name = "DIR")]
    includes: Vec<PathBuf>,
    /// Event type, e.g. shop.order.placed.
    #[arg(long = "type")]
    ty: String,
    /// Fully qualified payload message, e.g. shop.v1.OrderPlaced.
    #[arg(long)]
    message: String,
    /// Semver to register; the registry assigns the smallest valid one when left out.
    #[arg(long)]
    version: Option<String>,
    /// text: a line and a table of changes; json: one object.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

/// Serves `evmesh/v1/options.proto` from the copy compiled into the CLI, after the
/// include directories: a service's .proto imports it without vendoring it.
struct EvmeshOptions;

impl protox::file::FileResolver for EvmeshOptions {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == "evmesh/v1/options.proto" {
            protox::file::File::from_source(name, evmesh_proto::OPTIONS_PROTO)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn compile(args: &ProtoArgs) -> anyhow::Result<Vec<u8>> {
    use protox::file::{ChainFileResolver, GoogleFileResolver, IncludeFileResolver};
    let includes = if args.includes.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.includes.clone()
    };
    let mut resolver = ChainFileResolver::new();
    for include in includes {
        resolver.add(IncludeFileResolver::new(include));
    }
    resolver.add(EvmeshOptions);
    resolver.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files(&args.files)
        .map_err(|e| anyhow!("cannot compile {}: {e}", args.files[0].display()))?;
    let set = compiler.file_descriptor_set();
    // Check locally first, for a clear error before any network.
    Schema::from_set(set.clone(), &args.message)
        .map_err(|e| anyhow!("--message {}: {e}", args.message))?;
    Ok(set.encode_to_vec())
}

async fn registry(server: &NodeArg) -> anyhow::Result<SchemaRegistryClient<Transport>> {
    Ok(SchemaRegistryClient::new(channel(server).await?)
        .max_decoding_message_size(64 * 1024 * 1024))
}

fn bump_name(b: i32) -> &'static str {
    match pb::Bump::try_from(b) {
        Ok(pb::Bump::None) => "NONE",
        Ok(pb::Bump::Patch) => "PATCH",
        Ok(pb::Bump::Minor) => "MINOR",
        Ok(pb::Bump::Major) => "MAJOR",
        Err(_) => "?",
    }
}

fn request(args: &ProtoArgs) -> anyhow::Result<pb::RegisterSchemaRequest> {
    Ok(pb::RegisterSchemaRequest {
        r#type: args.ty.clone(),
        version: args.version.clone().unwrap_or_default(),
        message_name: args.message.clone(),
        descriptor_set: compile(args)?,
    })
}

/// Changes as a table: rule, path, the bump each needs, what changed.
fn changes_table(changes: &[pb::SchemaChange]) -> String {
    let rows: Vec<Vec<String>> = changes
        .iter()
        .map(|c| {
            vec![
                c.rule.clone(),
                c.path.clone(),
                bump_name(c.needs).into(),
                c.message.clone(),
            ]
        })
        .collect();
    output::table(&["RULE", "PATH", "NEEDS", "CHANGE"], &rows)
}

fn changes_json(changes: &[pb::SchemaChange]) -> Value {
    changes
        .iter()
        .map(|c| json!({"rule": c.rule, "path": c.path, "message": c.message, "needs": bump_name(c.needs)}))
        .collect()
}

pub(crate) async fn run(args: SchemaArgs) -> anyhow::Result<()> {
    let server = &args.node;
    match args.command {
        SchemaCommand::Register(args) => {
            let request = request(&args)?;
            let response = registry(server)
                .await?
                .register_schema(request)
                .await
                .map_err(rpc)?
                .into_inner();
            let schema = response
                .schema
                .ok_or_else(|| anyhow!("the node sent no schema"))?;
            if args.output == Format::Json {
                println!(
                    "{}",
                    json!({"type": schema.r#type, "version": schema.version, "message_name": schema.message_name,
                           "created": response.created, "changes": changes_json(&response.changes)})
                );
            } else {
                let what = if response.created {
                    "registered"
                } else {
                    "already registered"
                };
                println!(
                    "{what} {} {} ({})",
                    schema.r#type, schema.version, schema.message_name
                );
                if !response.changes.is_empty() {
                    print!("{}", changes_table(&response.changes));
                }
            }
        }
        SchemaCommand::Check(args) => {
            let request = request(&args)?;
            let c = registry(server)
                .await?
                .check_schema(request)
                .await
                .map_err(rpc)?
                .into_inner();
            if args.output == Format::Json {
                println!(
                    "{}",
                    json!({
                        "compatible": c.compatible, "version": c.version, "suggested_version": c.suggested_version,
                        "predecessor": c.predecessor, "required_bump": bump_name(c.required_bump),
                        "declared_bump": bump_name(c.declared_bump), "already_registered": c.already_registered,
                        "conflict": c.conflict, "changes": changes_json(&c.changes),
                        "violations": c.violations.iter().map(|v| json!({"rule": v.rule, "path": v.path,
                            "message": v.message, "needs": bump_name(v.needs), "against": v.against_version})).collect::<Vec<_>>(),
                    })
                );
            } else {
                let predecessor = if c.predecessor.is_empty() {
                    "none".to_owned()
                } else {
                    c.predecessor.clone()
                };
                println!(
                    "{} {}: predecessor {predecessor}, changes need {}, the version declares {}; smallest valid version {}",
                    args.ty,
                    c.version,
                    bump_name(c.required_bump),
                    bump_name(c.declared_bump),
                    c.suggested_version
                );
                let rows: Vec<Vec<String>> = c
                    .violations
                    .iter()
                    .map(|v| {
                        vec![
                            v.rule.clone(),
                            v.path.clone(),
                            bump_name(v.needs).into(),
                            v.against_version.clone(),
                            v.message.clone(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    print!(
                        "{}",
                        output::table(&["RULE", "PATH", "NEEDS", "AGAINST", "CHANGE"], &rows)
                    );
                } else if !c.changes.is_empty() {
                    print!("{}", changes_table(&c.changes));
                }
            }
            if c.conflict {
                bail!(
                    "version {} of {} is registered with other content",
                    c.version,
                    args.ty
                );
            }
            if !c.compatible {
                bail!(
                    "version {} of {} is too small for its changes; use {}",
                    c.version,
                    args.ty,
                    c.suggested_version
                );
            }
        }
        SchemaCommand::List { ty, output: format } => {
            let client = registry(server).await?;
            let schemas = all_pages(
                |after| {
                    let mut client = client.clone();
                    let request = pb::ListSchemasRequest {
                        r#type: ty.clone().unwrap_or_default(),
                        after_type: after.unwrap_or_default(),
                        limit: 0,
                    };
                    async move {
                        let page = client.list_schemas(request).await?.into_inner();
                        Ok((page.schemas, page.more))
                    }
                },
                |s: &pb::Schema| s.r#type.clone(),
            )
            .await?;
            if format == Format::Json {
                for s in &schemas {
                    println!(
                        "{}",
                        json!({"type": s.r#type, "version": s.version, "message_name": s.message_name,
                               "registered_at": output::time(s.registered_at.as_ref())})
                    );
                }
            } else {
                let rows: Vec<Vec<String>> = schemas
                    .iter()
                    .map(|s| {
                        vec![
                            s.r#type.clone(),
                            s.version.clone(),
                            s.message_name.clone(),
                            output::time(s.registered_at.as_ref())
                                .as_str()
                                .unwrap_or("-")
                                .to_owned(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(&["TYPE", "VERSION", "MESSAGE", "REGISTERED_AT"], &rows)
                );
            }
        }
        SchemaCommand::Diff {
            ty,
            from,
            to,
            output: format,
        } => diff(server, ty, from, to, format).await?,
        SchemaCommand::Show {
            ty,
            version,
            output: format,
        } => {
            let s = registry(server)
                .await?
                .get_schema(pb::GetSchemaRequest {
                    r#type: ty,
                    version: version.unwrap_or_default(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            let schema = Schema::new(&s.descriptor_set, &s.message_name)
                .map_err(|e| anyhow!("the node sent a bad schema: {e}"))?;
            if format == ShowFormat::Proto {
                let own = schema.message().parent_file();
                let mut files: Vec<_> = schema.pool().files().collect();
                files.sort_by_key(|f| (f.name() != own.name(), f.name().to_owned()));
                for (i, file) in files.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    println!("// {}", file.name());
                    print!("{}", evmesh_schema::proto_source(file));
                }
            } else if format == ShowFormat::Json {
                let set = prost_types::FileDescriptorSet::decode(s.descriptor_set.as_slice())?;
                println!(
                    "{}",
                    json!({"type": s.r#type, "version": s.version, "message_name": s.message_name,
                           "registered_at": output::time(s.registered_at.as_ref()),
                           "files": set.file.iter().map(|f| f.name().to_owned()).collect::<Vec<_>>(),
                           "definition": describe(schema.message())})
                );
            } else {
                println!("{} {} ({})", s.r#type, s.version, s.message_name);
                print!("{}", describe(schema.message()));
            }
        }
    }
    Ok(())
}

async fn diff(
    server: &NodeArg,
    ty: String,
    from: String,
    to: String,
    format: Format,
) -> anyhow::Result<()> {
    let d = registry(server)
        .await?
        .compare_schemas(pb::CompareSchemasRequest {
            r#type: ty,
            from_version: from,
            to_version: to,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if format == Format::Json {
        println!(
            "{}",
            json!({"type": d.r#type, "from_version": d.from_version, "to_version": d.to_version,
                   "required_bump": bump_name(d.required_bump), "declared_bump": bump_name(d.declared_bump),
                   "compatible": d.compatible, "changes": changes_json(&d.changes),
                   "omitted_changes": d.omitted_changes})
        );
        return Ok(());
    }
    println!(
        "{} {} -> {}: changes need {}, the step declares {}; {}",
        d.r#type,
        d.from_version,
        d.to_version,
        bump_name(d.required_bump),
        bump_name(d.declared_bump),
        if d.compatible {
            "allowed"
        } else {
            "not allowed: the version is too small for its changes"
        }
    );
    if !d.changes.is_empty() {
        print!("{}", changes_table(&d.changes));
    }
    if d.omitted_changes > 0 {
        println!("… and {} more changes", d.omitted_changes);
    }
    Ok(())
}

/// The payload message and every message and enum it reaches, in proto-like text.
fn describe(root: &MessageDescriptor) -> String {
    let mut out = String::new();
    let mut todo = vec![Kind::Message(root.clone())];
    let mut seen = std::collections::HashSet::new();
    while let Some(kind) = todo.pop() {
        match kind {
            Kind::Message(m) if !m.is_map_entry() => {
                if !seen.insert(m.full_name().to_owned()) {
                    continue;
                }
                out.push_str(&format!("message {} {{\n", m.full_name()));
                for f in m.fields() {
                    let ty = type_name(&f);
                    out.push_str(&format!("  {ty} {} = {};\n", f.name(), f.number()));
                    let inner = if f.is_map() {
                        match f.kind() {
                            Kind::Message(entry) => entry.get_field(2).map(|v| v.kind()),
                            _ => None,
                        }
                    } else {
                        Some(f.kind())
                    };
                    if let Some(k @ (Kind::Message(_) | Kind::Enum(_))) = inner {
                        todo.push(k);
                    }
                }
                out.push_str("}\n");
            }
            Kind::Enum(e) => {
                if !seen.insert(e.full_name().to_owned()) {
                    continue;
                }
                out.push_str(&format!("enum {} {{\n", e.full_name()));
                for v in e.values() {
                    out.push_str(&format!("  {} = {};\n", v.name(), v.number()));
                }
                out.push_str("}\n");
            }
            _ => {}
        }
    }
    out
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn type_name(f: &prost_reflect::FieldDescriptor) -> String {
    if f.is_map()
        && let Kind::Message(entry) = f.kind()
    {
        let key = entry
            .get_field(1)
            .map(|k| kind_name(&k.kind()))
            .unwrap_or_default();
        let value = entry
            .get_field(2)
            .map(|v| kind_name(&v.kind()))
            .unwrap_or_default();
        return format!("map<{key}, {value}>");
    }
    let base = kind_name(&f.kind());
    if f.is_list() {
        format!("repeated {base}")
    } else if f.field_descriptor_proto().proto3_optional() {
        format!("optional {base}")
    } else {
        base
    }
}

/// Registered schemas fetched on demand, by (type, version).
pub(crate) struct Payloads {
    client: SchemaRegistryClient<Transport>,
    cache: HashMap<(String, String), Option<(String, MessageDescriptor)>>,
}

impl Payloads {
    pub(crate) async fn connect(server: &NodeArg) -> anyhow::Result<Self> {
        Ok(Self {
            client: registry(server).await?,
            cache: HashMap::new(),
        })
    }

    /// The version and payload message of a type's schema (latest when `version`
    /// is empty); `None` when it is not registered.
    async fn message(
        &mut self,
        ty: &str,
        version: &str,
    ) -> anyhow::Result<Option<(String, MessageDescriptor)>> {
        let key = (ty.to_owned(), version.to_owned());
        if let Some(found) = self.cache.get(&key) {
            return Ok(found.clone());
        }
        let found = match self
            .client
            .get_schema(pb::GetSchemaRequest {
                r#type: ty.to_owned(),
                version: version.to_owned(),
            })
            .await
        {
            Ok(s) => {
                let s = s.into_inner();
                let schema = Schema::new(&s.descriptor_set, &s.message_name)
                    .map_err(|e| anyhow!("the node sent a bad schema: {e}"))?;
                Some((s.version, schema.message().clone()))
            }
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => return Err(rpc(status)),
        };
        self.cache.insert(key, found.clone());
        Ok(found)
    }

    /// A payload for `ty` from JSON, through its registered schema.
    pub(crate) async fn encode_json(
        &mut self,
        ty: &str,
        version: &str,
        text: &str,
    ) -> anyhow::Result<prost_types::Any> {
        let (found_version, message) = self.message(ty, version).await?.ok_or_else(|| {
            if version.is_empty() {
                anyhow!("no schema is registered for {ty}: --json needs one")
            } else {
                anyhow!("version {version} of {ty} is not registered")
            }
        })?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let dynamic = DynamicMessage::deserialize(message.clone(), &mut deserializer)
            .and_then(|m| deserializer.end().map(|()| m))
            .map_err(|e| {
                anyhow!(
                    "--json does not match {} {found_version} ({}): {e}",
                    ty,
                    message.full_name()
                )
            })?;
        Ok(prost_types::Any {
            type_url: format!("type.googleapis.com/{}", message.full_name()),
            value: dynamic.encode_to_vec(),
        })
    }

    /// The payload as JSON through its schema, or `None` when the type or version is
    /// not registered or the bytes do not decode.
    pub(crate) async fn decode_json(&mut self, event: &pb::Event) -> anyhow::Result<Option<Value>> {
        let Some(payload) = &event.payload else {
            return Ok(None);
        };
        let Some((_, message)) = self.message(&event.r#type, &event.schema_version).await? else {
            return Ok(None);
        };
        if !payload
            .type_url
            .ends_with(&format!("/{}", message.full_name()))
        {
            return Ok(None);
        }
        let Ok(dynamic) = DynamicMessage::decode(message, payload.value.as_slice()) else {
            return Ok(None);
        };
        let mut value = serde_json::to_value(&dynamic).context("payload to JSON")?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("@type".into(), Value::String(payload.type_url.clone()));
        }
        Ok(Some(value))
    }
}
