//! A schema: a normalised, self-contained descriptor set and its payload message.

use std::collections::BTreeMap;

use prost::Message;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use prost_types::{FileDescriptorProto, FileDescriptorSet};

use crate::descriptors::{self, SchemaLimits, quoted};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("descriptor_set is not a valid FileDescriptorSet: {0}")]
    Decode(String),
    #[error("descriptor_set is not self-contained or not valid: {0}")]
    Invalid(String),
    #[error("message {} is not in descriptor_set", quoted(.0))]
    MessageNotFound(String),
    #[error("message_name is required")]
    MessageRequired,
    #[error("{0}")]
    TooLarge(String),
}

/// One event schema. Normalised: only the file defining the payload message and its
/// transitive imports, sorted by name, so equal content has equal bytes.
#[derive(Debug, Clone)]
pub struct Schema {
    message: MessageDescriptor,
    encoded: Vec<u8>,
    has_required: bool,
}

impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        self.message.full_name() == other.message.full_name() && self.encoded == other.encoded
    }
}

impl Schema {
    /// Decodes, validates and normalises a `FileDescriptorSet` for `message`, within
    /// the default [`SchemaLimits`].
    pub fn new(descriptor_set: &[u8], message: &str) -> Result<Self, SchemaError> {
        Self::with_limits(descriptor_set, message, &SchemaLimits::default())
    }

    /// [`Schema::new`] within `limits`.
    pub fn with_limits(
        descriptor_set: &[u8],
        message: &str,
        limits: &SchemaLimits,
    ) -> Result<Self, SchemaError> {
        if descriptor_set.len() > limits.max_bytes {
            return Err(SchemaError::TooLarge(format!(
                "descriptor_set is {} bytes, at most {} allowed",
                descriptor_set.len(),
                limits.max_bytes
            )));
        }
        let set = FileDescriptorSet::decode(descriptor_set)
            .map_err(|e| SchemaError::Decode(e.to_string()))?;
        Self::from_set_with_limits(set, message, limits)
    }

    pub fn from_set(set: FileDescriptorSet, message: &str) -> Result<Self, SchemaError> {
        Self::from_set_with_limits(set, message, &SchemaLimits::default())
    }

    /// Validates the set as protoc would (names, syntax, imports, map entries, field
    /// types) before normalising it.
    pub fn from_set_with_limits(
        mut set: FileDescriptorSet,
        message: &str,
        limits: &SchemaLimits,
    ) -> Result<Self, SchemaError> {
        let message = message.strip_prefix('.').unwrap_or(message);
        if message.is_empty() {
            return Err(SchemaError::MessageRequired);
        }
        descriptors::before_pool(&mut set, limits)?;
        let pool = DescriptorPool::from_file_descriptor_set(set.clone())
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        descriptors::after_pool(&set, &pool)?;
        let descriptor = pool
            .get_message_by_name(message)
            .ok_or_else(|| SchemaError::MessageNotFound(message.to_owned()))?;
        // The file of the message and everything it imports, transitively.
        let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
        let mut todo = vec![descriptor.parent_file()];
        while let Some(file) = todo.pop() {
            if files.contains_key(file.name()) {
                continue;
            }
            files.insert(file.name().to_owned(), file.file_descriptor_proto().clone());
            todo.extend(file.dependencies());
        }
        let whole = files.len() == pool.files().len();
        let normalised = FileDescriptorSet {
            file: files.into_values().collect(),
        };
        let encoded = normalised.encode_to_vec();
        // A set of just the message's files holds what the pool holds: keep the pool
        // (a large schema's pool is many times its size, and takes a while to build).
        let pool = if whole {
            pool
        } else {
            DescriptorPool::from_file_descriptor_set(normalised)
                .map_err(|e| SchemaError::Invalid(e.to_string()))?
        };
        let message = pool
            .get_message_by_name(message)
            .ok_or_else(|| SchemaError::MessageNotFound(message.to_owned()))?;
        Ok(Self::compiled(message, encoded))
    }

    /// A schema as [`Schema::new`] normalised it and the registry stored it: checked
    /// as protoc would again (a stored schema may predate a check) and compiled once,
    /// within no limits, for what was accepted once is not refused later. Half the
    /// work of [`Schema::new`], which compiles a second time after normalising.
    pub fn stored(descriptor_set: &[u8], message: &str) -> Result<Self, SchemaError> {
        let mut set = FileDescriptorSet::decode(descriptor_set)
            .map_err(|e| SchemaError::Decode(e.to_string()))?;
        descriptors::before_pool(&mut set, &SchemaLimits::none())?;
        let pool = DescriptorPool::from_file_descriptor_set(set.clone())
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        descriptors::after_pool(&set, &pool)?;
        let message = message.strip_prefix('.').unwrap_or(message);
        let message = pool
            .get_message_by_name(message)
            .ok_or_else(|| SchemaError::MessageNotFound(message.to_owned()))?;
        Ok(Self::compiled(message, descriptor_set.to_vec()))
    }

    fn compiled(message: MessageDescriptor, encoded: Vec<u8>) -> Self {
        let has_required = message.parent_pool().all_messages().any(|m| {
            m.fields()
                .any(|f| f.cardinality() == prost_reflect::Cardinality::Required)
        });
        Self {
            message,
            encoded,
            has_required,
        }
    }

    /// Whether some message of the schema has a proto2 `required` field, which a
    /// payload must carry.
    pub fn has_required_fields(&self) -> bool {
        self.has_required
    }

    /// The normalised descriptor set, encoded.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    pub fn message(&self) -> &MessageDescriptor {
        &self.message
    }

    /// Fully qualified name of the payload message, e.g. `shop.v1.OrderPlaced`.
    pub fn message_name(&self) -> &str {
        self.message.full_name()
    }

    pub fn pool(&self) -> &DescriptorPool {
        self.message.parent_pool()
    }
}
