//! A schema: a normalised, self-contained descriptor set and its payload message.

use std::collections::BTreeMap;

use prost::Message;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use prost_types::{FileDescriptorProto, FileDescriptorSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("descriptor_set is not a valid FileDescriptorSet: {0}")]
    Decode(String),
    #[error("descriptor_set is not self-contained or not valid: {0}")]
    Invalid(String),
    #[error("message {0:?} is not in descriptor_set")]
    MessageNotFound(String),
    #[error("message_name is required")]
    MessageRequired,
}

/// One event schema. Normalised: only the file defining the payload message and its
/// transitive imports, sorted by name, so equal content has equal bytes.
#[derive(Debug, Clone)]
pub struct Schema {
    message: MessageDescriptor,
    encoded: Vec<u8>,
}

impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        self.message.full_name() == other.message.full_name() && self.encoded == other.encoded
    }
}

impl Schema {
    /// Decodes, validates and normalises a `FileDescriptorSet` for `message`.
    pub fn new(descriptor_set: &[u8], message: &str) -> Result<Self, SchemaError> {
        let set = FileDescriptorSet::decode(descriptor_set)
            .map_err(|e| SchemaError::Decode(e.to_string()))?;
        Self::from_set(set, message)
    }

    pub fn from_set(set: FileDescriptorSet, message: &str) -> Result<Self, SchemaError> {
        let message = message.strip_prefix('.').unwrap_or(message);
        if message.is_empty() {
            return Err(SchemaError::MessageRequired);
        }
        let pool = DescriptorPool::from_file_descriptor_set(set)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
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
        let normalised = FileDescriptorSet {
            file: files.into_values().collect(),
        };
        let encoded = normalised.encode_to_vec();
        let pool = DescriptorPool::from_file_descriptor_set(normalised)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        let message = pool
            .get_message_by_name(message)
            .ok_or_else(|| SchemaError::MessageNotFound(message.to_owned()))?;
        Ok(Self { message, encoded })
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
