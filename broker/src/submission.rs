//! Turns a submission from either API into a core command: validates and normalises the
//! definition, computes the job id, moves large inline inputs to the blob store and checks that
//! referenced blobs exist and match their names. This runs on the connection's task, not the
//! core's, so the hashing of many submissions proceeds in parallel.

use std::sync::Arc;

use bytes::Bytes;
use protocol::JobDefinition;
use protocol::definition::DataRef;
use protocol::id::validate_name;
use protocol::messages::{ErrorBody, ErrorCode};

use crate::blob::{BlobStore, INLINE_MAX};
use crate::core::Submit;

/// Highest priority magnitude accepted.
pub const MAX_PRIORITY: i32 = 1_000_000;
/// Most retries a submission may ask for.
pub const MAX_RETRIES: u32 = 100;

/// Validates a submission and builds the core's command.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    queue: &str,
    definition: JobDefinition,
    namespace: Option<String>,
    priority: Option<i32>,
    force: bool,
    retries: Option<u32>,
    blobs: &BlobStore,
) -> Result<Submit, ErrorBody> {
    validate_name("queue", queue, false).map_err(|m| ErrorBody::new(ErrorCode::InvalidDefinition, m))?;
    if let Some(ns) = &namespace {
        validate_name("namespace", ns, true)
            .map_err(|m| ErrorBody::new(ErrorCode::InvalidDefinition, format!("`namespace`: {m}")))?;
    }
    let priority = priority.unwrap_or(0);
    if priority.abs() > MAX_PRIORITY {
        return Err(ErrorBody::new(
            ErrorCode::InvalidDefinition,
            format!("`priority`: must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
        ));
    }
    if retries.is_some_and(|r| r > MAX_RETRIES) {
        return Err(ErrorBody::new(ErrorCode::InvalidDefinition, format!("`retries`: at most {MAX_RETRIES}")));
    }
    let mut definition = definition.normalize().map_err(|mut e| {
        // Paths are relative to the submission, over HTTP and websocket alike, as parse errors are.
        e.field = if e.field.is_empty() { "definition".into() } else { format!("definition.{}", e.field) };
        ErrorBody::invalid(&e)
    })?;
    // The id depends only on content, so it is the same before and after inputs move.
    let job = definition.job_id();
    resolve_inputs(&mut definition, blobs).await?;
    let json = serde_json::to_string(&definition).expect("definitions serialise");
    Ok(Submit {
        queue: queue.to_string(),
        job,
        gpus: definition.gpus(),
        tags: definition.tags,
        definition: Arc::from(json),
        namespace,
        priority,
        force,
        retries,
    })
}

/// Stores inline inputs above [`INLINE_MAX`] as blobs and replaces them by blob refs; checks that
/// every blob ref names a stored blob of that size whose content matches the name.
async fn resolve_inputs(definition: &mut JobDefinition, blobs: &BlobStore) -> Result<(), ErrorBody> {
    for (path, data) in definition.inputs.iter_mut() {
        let field = |e: crate::blob::BlobError| {
            let mut body = e.body();
            if body.code == ErrorCode::NotFound || body.code == ErrorCode::HashMismatch {
                body.code = ErrorCode::InvalidDefinition;
            }
            body.message = format!("`definition.inputs.{path}`: {}", body.message);
            body
        };
        match data {
            DataRef::Blob { sha256, size } => blobs.ensure(sha256, *size).await.map_err(field)?,
            DataRef::Text { .. } | DataRef::Base64 { .. } | DataRef::Json { .. } => {
                let Some(bytes) = data.inline_bytes() else { continue };
                if bytes.len() > INLINE_MAX {
                    let size = bytes.len() as u64;
                    let sha256 = blobs.put_bytes(Bytes::from(bytes)).await.map_err(field)?;
                    *data = DataRef::Blob { sha256, size };
                }
            }
            DataRef::Url { .. } => {}
        }
    }
    Ok(())
}
