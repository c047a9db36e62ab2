//! Who calls, and what they may do: the principals of the `--auth` file, each with
//! its credentials (bearer tokens, stored as SHA-256 digests; mTLS identities) and
//! its permissions, NATS-style: patterns of event types it may publish and read,
//! with deny patterns that win over allow, the groups it may use, its access to the
//! registry, and whether it may administer groups.
//!
//! The file is read again on SIGHUP ([`Auth::reload`]). A call holds the credential
//! it came with, not a principal: every check asks the file as it is now, so a
//! credential or principal removed, or a permission narrowed, takes effect at once,
//! on streams already open too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use evmesh_store::Pattern;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// The prefix of tokens that `evmesh auth token` makes.
pub const TOKEN_PREFIX: &str = "evm_";

/// What a principal may do with the schema registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryAccess {
    #[default]
    None,
    Read,
    Write,
}

impl RegistryAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryAccess::None => "none",
            RegistryAccess::Read => "read",
            RegistryAccess::Write => "write",
        }
    }
}

/// The file's form of one principal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    certificates: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    registry: RegistryAccess,
    #[serde(default)]
    admin: bool,
    max_subscriptions: Option<usize>,
    max_publish_streams: Option<usize>,
    publish_rate: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthEntries {
    #[serde(default)]
    principal: Vec<PrincipalEntry>,
}

/// Allow and deny patterns over event types; deny wins.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl Rules {
    /// Whether an event of this type is allowed.
    pub fn permits(&self, event_type: &str) -> bool {
        self.allow.iter().any(|p| p.matches(event_type, ""))
            && !self.deny.iter().any(|p| p.matches(event_type, ""))
    }

    /// The allow pattern that covers every type `pattern` selects, when one does.
    fn covering(&self, pattern: &Pattern) -> bool {
        self.allow.iter().any(|a| a.covers(pattern))
    }

    /// A deny pattern that selects some of the types `pattern` selects.
    fn denied_within(&self, pattern: &Pattern) -> Option<&Pattern> {
        self.deny.iter().find(|d| d.overlaps(pattern))
    }

    /// A deny pattern that selects every type `pattern` selects.
    fn denied_wholly(&self, pattern: &Pattern) -> Option<&Pattern> {
        self.deny.iter().find(|d| d.covers(pattern))
    }

    /// Whether every type is allowed: `>` allowed, nothing denied.
    fn everything(&self) -> bool {
        self.deny.is_empty() && self.allow.iter().any(|p| p.as_str() == ">")
    }
}

/// Caps on what one principal holds at once, and how fast it may publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrincipalLimits {
    pub max_subscriptions: Option<usize>,
    pub max_publish_streams: Option<usize>,
    /// Events per second, with a burst of as many.
    pub publish_rate: Option<u32>,
}

/// One principal of the auth file.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    tokens: Vec<[u8; 32]>,
    certificates: Vec<String>,
    pub publish: Rules,
    pub subscribe: Rules,
    groups: Vec<String>,
    pub registry: RegistryAccess,
    pub admin: bool,
    pub limits: PrincipalLimits,
}

/// Whether `name` matches `glob`, where `*` stands for any run of characters.
fn glob_matches(glob: &str, name: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn denied(principal: &str, action: &str, what: &str) -> Status {
    Status::permission_denied(format!("principal {principal:?} may not {action} {what}"))
}

impl Principal {
    /// One line saying what it may do, with no secret in it.
    pub fn summary(&self) -> String {
        let list = |r: &Rules| {
            let allow: Vec<&str> = r.allow.iter().map(Pattern::as_str).collect();
            let deny: Vec<&str> = r.deny.iter().map(Pattern::as_str).collect();
            if deny.is_empty() {
                format!("[{}]", allow.join(", "))
            } else {
                format!("[{}] except [{}]", allow.join(", "), deny.join(", "))
            }
        };
        format!(
            "{}: {} token(s), certificates [{}]; publish {}; subscribe {}; groups [{}]; registry {}; admin {}",
            self.name,
            self.tokens.len(),
            self.certificates.join(", "),
            list(&self.publish),
            list(&self.subscribe),
            self.groups.join(", "),
            self.registry.as_str(),
            self.admin
        )
    }

    /// Whether it may use the group `name`.
    pub fn may_use_group(&self, name: &str) -> bool {
        self.groups.iter().any(|g| glob_matches(g, name))
    }

    pub fn may_read(&self, event_type: &str) -> bool {
        self.subscribe.permits(event_type)
    }

    pub fn check_publish(&self, event_type: &str) -> Result<(), Status> {
        if self.publish.permits(event_type) {
            Ok(())
        } else {
            Err(denied(&self.name, "publish", event_type))
        }
    }

    pub fn check_group(&self, group: &str) -> Result<(), Status> {
        if self.may_use_group(group) {
            Ok(())
        } else {
            Err(denied(&self.name, "use group", &format!("{group:?}")))
        }
    }

    /// Seek, delete, redrive and purge: admin, on a group it may use.
    pub fn check_admin(&self, action: &str, group: &str) -> Result<(), Status> {
        if !self.admin {
            return Err(denied(
                &self.name,
                action,
                &format!("group {group:?} (it is not admin)"),
            ));
        }
        self.check_group(group)
    }

    /// A backup holds every event: admin, reading every type.
    pub fn check_backup(&self) -> Result<(), Status> {
        if self.admin && self.subscribe.everything() {
            Ok(())
        } else {
            Err(denied(
                &self.name,
                "take",
                "a backup (it needs admin and subscribe \">\" with nothing denied)",
            ))
        }
    }

    pub fn check_registry(&self, needed: RegistryAccess) -> Result<(), Status> {
        if self.registry >= needed {
            return Ok(());
        }
        let action = match needed {
            RegistryAccess::Write => "register",
            _ => "read",
        };
        Err(denied(
            &self.name,
            action,
            &format!(
                "schemas (its registry access is {})",
                self.registry.as_str()
            ),
        ))
    }

    /// A subscription's patterns: each within `subscribe` and not wholly denied;
    /// for a group, none reaching a denied type (its members share one position, so
    /// the node cannot skip for one what another reads).
    pub fn check_subscription(
        &self,
        patterns: &[Pattern],
        group: Option<&str>,
    ) -> Result<(), Status> {
        if let Some(group) = group {
            self.check_group(group)?;
        }
        for pattern in patterns {
            if !self.subscribe.covering(pattern) {
                return Err(denied(
                    &self.name,
                    "subscribe to",
                    &format!(
                        "{}: it is not within its subscribe patterns",
                        pattern.subject()
                    ),
                ));
            }
            if let Some(deny) = self.subscribe.denied_wholly(pattern) {
                return Err(denied(
                    &self.name,
                    "subscribe to",
                    &format!("{}: deny_subscribe has {deny}", pattern.subject()),
                ));
            }
            if let Some(group) = group
                && let Some(deny) = self.subscribe.denied_within(pattern)
            {
                return Err(denied(
                    &self.name,
                    "subscribe to",
                    &format!(
                        "{} in group {group:?}: it reaches {deny}, which deny_subscribe holds back (an ephemeral subscription skips those; a group cannot)",
                        pattern.subject()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Why an auth file cannot be used: its path, the line, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", .path.display(), .line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct AuthFileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// The principals of one reading of the file.
#[derive(Debug, Default)]
pub struct Policy {
    principals: Vec<Arc<Principal>>,
}

/// The line of byte `offset` in `text`, from 1.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// `sha256:` and 64 hex digits, as the file holds a token.
fn parse_digest(entry: &str) -> Option<[u8; 32]> {
    let hex = entry.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The line of the file that `sha256:…` of a new token goes on.
pub fn token_line(token: &str) -> String {
    let hex: String = digest(token).iter().map(|b| format!("{b:02x}")).collect();
    format!("tokens = [\"sha256:{hex}\"]")
}

impl Policy {
    /// Parses and checks an auth file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, AuthFileError> {
        let error = |line: Option<usize>, message: String| AuthFileError {
            path: path.to_owned(),
            line,
            message,
        };
        let entries: AuthEntries = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            error(line, e.message().to_owned())
        })?;
        // Each [[principal]] header's line, in order, for errors about its values.
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[principal]]"))
            .map(|(i, _)| i + 1)
            .collect();
        let mut principals: Vec<Arc<Principal>> = Vec::new();
        for (i, entry) in entries.principal.into_iter().enumerate() {
            let line = headers.get(i).copied();
            let name = entry.name.clone();
            let bad = |message: String| error(line, format!("principal {name:?}: {message}"));
            if name.trim().is_empty() {
                return Err(error(line, "a principal needs a name".into()));
            }
            if principals.iter().any(|p| p.name == name) {
                return Err(bad("another principal has this name".into()));
            }
            let mut tokens = Vec::new();
            for (k, t) in entry.tokens.iter().enumerate() {
                let d = parse_digest(t).ok_or_else(|| {
                    bad(format!(
                        "tokens[{k}] is not sha256: and 64 hex digits (`evmesh auth token` prints the line to use; never put a token itself in the file)"
                    ))
                })?;
                if let Some(other) = principals.iter().find(|p| p.tokens.contains(&d)) {
                    return Err(bad(format!(
                        "tokens[{k}] is also a token of principal {:?}",
                        other.name
                    )));
                }
                tokens.push(d);
            }
            for (k, c) in entry.certificates.iter().enumerate() {
                if !identity_form(c) {
                    return Err(bad(format!(
                        "certificates[{k}] {c:?} is not CN=…, DNS:…, URI:…, EMAIL:… or IP:…"
                    )));
                }
                if let Some(other) = principals.iter().find(|p| p.certificates.contains(c)) {
                    return Err(bad(format!(
                        "certificates[{k}] {c:?} also maps to principal {:?}",
                        other.name
                    )));
                }
            }
            let patterns = |field: &str, list: &[String]| -> Result<Vec<Pattern>, AuthFileError> {
                list.iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let pattern = Pattern::parse(p)
                            .map_err(|e| bad(format!("{field}[{k}] {p:?} {e}")))?;
                        if pattern.has_version_requirement() {
                            return Err(bad(format!(
                                "{field}[{k}] {p:?}: permissions are on event types; a version requirement has no place here"
                            )));
                        }
                        Ok(pattern)
                    })
                    .collect()
            };
            for (k, g) in entry.groups.iter().enumerate() {
                if g.is_empty() || g.chars().any(|c| c.is_whitespace()) {
                    return Err(bad(format!(
                        "groups[{k}] {g:?} is not a group name or glob"
                    )));
                }
            }
            for (field, value) in [
                ("max_subscriptions", entry.max_subscriptions),
                ("max_publish_streams", entry.max_publish_streams),
                ("publish_rate", entry.publish_rate.map(|r| r as usize)),
            ] {
                if value == Some(0) {
                    return Err(bad(format!(
                        "{field} must be at least 1 (leave it out for no cap)"
                    )));
                }
            }
            principals.push(Arc::new(Principal {
                publish: Rules {
                    allow: patterns("publish", &entry.publish)?,
                    deny: patterns("deny_publish", &entry.deny_publish)?,
                },
                subscribe: Rules {
                    allow: patterns("subscribe", &entry.subscribe)?,
                    deny: patterns("deny_subscribe", &entry.deny_subscribe)?,
                },
                name: entry.name,
                tokens,
                certificates: entry.certificates,
                groups: entry.groups,
                registry: entry.registry,
                admin: entry.admin,
                limits: PrincipalLimits {
                    max_subscriptions: entry.max_subscriptions,
                    max_publish_streams: entry.max_publish_streams,
                    publish_rate: entry.publish_rate,
                },
            }));
        }
        Ok(Self { principals })
    }

    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthFileError {
            path: path.to_owned(),
            line: None,
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.principals.iter().map(|p| p.as_ref())
    }

    /// The principal a credential stands for now.
    fn resolve(&self, credential: &Credential) -> Option<Arc<Principal>> {
        match credential {
            Credential::Token(digest) => {
                // Every stored digest is compared, in constant time, whatever matches.
                let mut found = None;
                for p in &self.principals {
                    for t in &p.tokens {
                        if bool::from(t.ct_eq(digest)) {
                            found = Some(p.clone());
                        }
                    }
                }
                found
            }
            Credential::Certificate(identities) => self
                .principals
                .iter()
                .find(|p| p.certificates.iter().any(|c| identities.contains(c)))
                .cloned(),
        }
    }
}

fn identity_form(entry: &str) -> bool {
    ["CN=", "DNS:", "URI:", "EMAIL:", "IP:"]
        .iter()
        .any(|prefix| entry.len() > prefix.len() && entry.starts_with(prefix))
}

/// What a call authenticated with: a token's digest, or the identities of its
/// client certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Token([u8; 32]),
    Certificate(Vec<String>),
}

/// The identities a client certificate (DER) offers: `CN=` of its subject, and
/// `DNS:`, `URI:`, `EMAIL:`, `IP:` of its subject alternative names.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| format!("CN={cn}"))
        .collect();
    if let Ok(Some(sans)) = cert.subject_alternative_name() {
        for name in &sans.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push(format!("DNS:{d}")),
                GeneralName::URI(u) => out.push(format!("URI:{u}")),
                GeneralName::RFC822Name(e) => out.push(format!("EMAIL:{e}")),
                GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// What one principal holds now, across reloads: counted streams and its
/// publish rate.
#[derive(Default)]
pub(crate) struct Holdings {
    pub(crate) subscriptions: AtomicUsize,
    pub(crate) publish_streams: AtomicUsize,
    pub(crate) limiter: Mutex<Option<(u32, Arc<crate::fairness::RateLimiter>)>>,
}

/// The auth file as it is now, and what each principal holds.
pub struct Auth {
    path: PathBuf,
    policy: RwLock<Arc<Policy>>,
    /// Bumped by every reload, so that a stream re-checks what it holds.
    generation: AtomicU64,
    changed: tokio::sync::watch::Sender<u64>,
    holdings: Mutex<HashMap<String, Arc<Holdings>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What a reload changed, by principal name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

fn same(a: &Principal, b: &Principal) -> bool {
    let rules = |r: &Rules| {
        (
            r.allow
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect::<Vec<_>>(),
            r.deny
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
    };
    a.tokens == b.tokens
        && a.certificates == b.certificates
        && rules(&a.publish) == rules(&b.publish)
        && rules(&a.subscribe) == rules(&b.subscribe)
        && a.groups == b.groups
        && a.registry == b.registry
        && a.admin == b.admin
        && a.limits == b.limits
}

impl Auth {
    /// Reads the file at `path`.
    pub fn load(path: &Path) -> Result<Arc<Self>, AuthFileError> {
        let policy = Policy::load(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            policy: RwLock::new(Arc::new(policy)),
            generation: AtomicU64::new(0),
            changed: tokio::sync::watch::Sender::new(0),
            holdings: Mutex::default(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again; on an error the principals stay as they were.
    pub fn reload(&self) -> Result<Reloaded, AuthFileError> {
        let new = Policy::load(&self.path)?;
        let old = self.policy();
        let mut reloaded = Reloaded::default();
        for p in new.principals() {
            match old.principals().find(|o| o.name == p.name) {
                None => reloaded.added.push(p.name.clone()),
                Some(o) if !same(o, p) => reloaded.changed.push(p.name.clone()),
                Some(_) => {}
            }
        }
        for o in old.principals() {
            if !new.principals().any(|p| p.name == o.name) {
                reloaded.removed.push(o.name.clone());
            }
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(generation);
        Ok(reloaded)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Says when the file was read again.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn holdings(&self, principal: &str) -> Arc<Holdings> {
        self.holdings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(principal.to_owned())
            .or_default()
            .clone()
    }

    /// The principal a call's credentials stand for: its bearer token when it
    /// sent one, else its client certificate.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&[u8]>,
    ) -> Result<Credential, Status> {
        let credential = match (authorization, certificate) {
            (Some(header), _) => {
                let token = std::str::from_utf8(header)
                    .ok()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        Status::unauthenticated("the authorization header is not `Bearer TOKEN`")
                    })?;
                Credential::Token(digest(token))
            }
            (None, Some(der)) => {
                let identities = certificate_identities(der);
                if identities.is_empty() {
                    return Err(Status::unauthenticated(
                        "the client certificate names no identity (CN or subject alternative name)",
                    ));
                }
                Credential::Certificate(identities)
            }
            (None, None) => {
                return Err(Status::unauthenticated(
                    "no credentials: send `authorization: Bearer TOKEN` (evmesh --token, EVMESH_TOKEN) or a client certificate",
                ));
            }
        };
        self.principal(&credential)?;
        Ok(credential)
    }

    /// The principal `credential` stands for now, or UNAUTHENTICATED.
    pub(crate) fn principal(&self, credential: &Credential) -> Result<Arc<Principal>, Status> {
        self.policy()
            .resolve(credential)
            .ok_or_else(|| match credential {
                Credential::Token(_) => {
                    Status::unauthenticated("the token is not one the auth file knows")
                }
                Credential::Certificate(identities) => Status::unauthenticated(format!(
                    "no principal of the auth file has certificate {}",
                    identities.join(" or ")
                )),
            })
    }
}

/// The caller of one request: the node's auth and the credential the call came
/// with. Absent when the node runs without `--auth`.
#[derive(Clone)]
pub(crate) struct Caller {
    pub(crate) auth: Arc<Auth>,
    pub(crate) credential: Arc<Credential>,
}

impl Caller {
    pub(crate) fn principal(&self) -> Result<Arc<Principal>, Status> {
        self.auth.principal(&self.credential)
    }
}

/// A caller's principal, looked up again only when the file was read again.
pub(crate) struct Current {
    caller: Caller,
    generation: u64,
    principal: Arc<Principal>,
}

impl Current {
    pub(crate) fn new(caller: Caller) -> Result<Self, Status> {
        let generation = caller.auth.generation();
        let principal = caller.principal()?;
        Ok(Self {
            caller,
            generation,
            principal,
        })
    }

    /// The principal as the file has it now.
    pub(crate) fn get(&mut self) -> Result<&Arc<Principal>, Status> {
        let now = self.caller.auth.generation();
        if now != self.generation {
            self.principal = self.caller.principal()?;
            self.generation = now;
        }
        Ok(&self.principal)
    }

    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.caller.auth.changes()
    }

    pub(crate) fn holdings(&self, principal: &str) -> Arc<Holdings> {
        self.caller.auth.holdings(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (glob, name, expect) in [
            ("*", "anything", true),
            ("orders", "orders", true),
            ("orders", "orders-2", false),
            ("orders-*", "orders-2", true),
            ("orders-*", "orders-", true),
            ("orders-*", "order", false),
            ("*.billing", "shop.billing", true),
            ("*.billing", "shop.billing.x", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob_matches(glob, name), expect, "{glob} vs {name}");
        }
    }

    const FILE: &str = r#"
[[principal]]
name = "orders"
tokens = ["sha256:0000000000000000000000000000000000000000000000000000000000000001"]
certificates = ["CN=orders"]
publish = ["shop.order.>"]
subscribe = ["shop.>"]
deny_subscribe = ["shop.payment.card.>"]
groups = ["orders", "orders-*"]
registry = "read"
"#;

    fn orders() -> Arc<Principal> {
        let policy = Policy::parse(Path::new("auth.toml"), FILE).unwrap();
        policy.principals[0].clone()
    }

    #[test]
    fn permissions_deny_wins() {
        let p = orders();
        assert!(p.check_publish("shop.order.placed").is_ok());
        assert!(p.check_publish("shop.payment.taken").is_err());
        assert!(p.may_read("shop.payment.taken"));
        assert!(!p.may_read("shop.payment.card.charged"));
        assert!(!p.may_read("billing.invoice.sent"));
        let patterns = |ps: &[&str]| {
            ps.iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(p.check_subscription(&patterns(&["shop.>"]), None).is_ok());
        let e = p
            .check_subscription(&patterns(&["shop.>"]), Some("orders"))
            .unwrap_err();
        assert!(
            e.message().contains("shop.payment.card.>"),
            "{}",
            e.message()
        );
        assert!(
            p.check_subscription(&patterns(&["shop.order.*"]), Some("orders-eu"))
                .is_ok()
        );
        assert!(
            p.check_subscription(&patterns(&["shop.order.*"]), Some("billing"))
                .is_err()
        );
        assert!(p.check_subscription(&patterns(&[">"]), None).is_err());
        assert!(
            p.check_subscription(&patterns(&["shop.payment.card.visa"]), None)
                .is_err()
        );
        assert!(p.check_registry(RegistryAccess::Read).is_ok());
        assert!(p.check_registry(RegistryAccess::Write).is_err());
        assert!(p.check_admin("seek", "orders").is_err());
        assert!(p.check_backup().is_err());
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, expect) in [
            (
                "[[principal]]\nname = \"a\"\ntokens = [\"abc\"]\n",
                "auth.toml:1: principal \"a\": tokens[0] is not sha256:",
            ),
            (
                "[[principal]]\nname = \"a\"\nbogus = 1\n",
                "auth.toml:3: unknown field `bogus`",
            ),
            (
                "[[principal]]\nname = \"a\"\n[[principal]]\nname = \"a\"\n",
                "auth.toml:3: principal \"a\": another principal has this name",
            ),
            (
                "[[principal]]\nname = \"a\"\npublish = [\"shop..x\"]\n",
                "publish[0] \"shop..x\" has an empty token",
            ),
            (
                "[[principal]]\nname = \"a\"\nsubscribe = [\"shop.>@^1\"]\n",
                "a version requirement has no place here",
            ),
            (
                "[[principal]]\nname = \"a\"\nregistry = \"all\"\n",
                "auth.toml:3: unknown variant `all`",
            ),
            (
                "[[principal]]\nname = \"a\"\ncertificates = [\"orders\"]\n",
                "is not CN=…",
            ),
            (
                "[[principal]]\nname = \"a\"\nmax_subscriptions = 0\n",
                "max_subscriptions must be at least 1",
            ),
        ] {
            let e = Policy::parse(Path::new("auth.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_token_resolves_by_its_digest_only() {
        let token = "evm_test";
        let text = format!("[[principal]]\nname = \"a\"\n{}\n", token_line(token));
        let policy = Policy::parse(Path::new("auth.toml"), &text).unwrap();
        assert_eq!(
            policy
                .resolve(&Credential::Token(digest(token)))
                .unwrap()
                .name,
            "a"
        );
        assert!(
            policy
                .resolve(&Credential::Token(digest("evm_other")))
                .is_none()
        );
        let certs = Credential::Certificate(vec!["CN=orders".into()]);
        assert!(policy.resolve(&certs).is_none());
    }
}

/// Authenticates every call but health checks before any handler runs: a call
/// without valid credentials is answered UNAUTHENTICATED; one with them carries its
/// [`Caller`] to the handler.
#[derive(Clone)]
pub(crate) struct AuthLayer(pub(crate) Option<Arc<Auth>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Authenticate<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

/// Health checks stay open: load balancers and orchestrators probe them.
const OPEN: &str = "/grpc.health.v1.Health/";

type Answer<B, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<B>, E>> + Send>>;

impl<S, Body, B> tower::Service<http::Request<Body>> for Authenticate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures_util::future::Either<S::Future, Answer<B, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let Some(auth) = &self.auth else {
            return Either::Left(self.inner.call(request));
        };
        if request.uri().path().starts_with(OPEN) {
            return Either::Left(self.inner.call(request));
        }
        let certificate = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        match auth.authenticate(authorization.as_deref(), certificate.as_deref()) {
            Ok(credential) => {
                request.extensions_mut().insert(Caller {
                    auth: auth.clone(),
                    credential: Arc::new(credential),
                });
                Either::Left(self.inner.call(request))
            }
            Err(status) => {
                tracing::debug!(
                    path = request.uri().path(),
                    reason = status.message(),
                    "unauthenticated call"
                );
                Either::Right(Box::pin(std::future::ready(Ok(status.into_http()))))
            }
        }
    }
}
