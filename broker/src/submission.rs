//! Turns a submission from either API into a core command: validates and normalises the
//! definition and computes the job id. This runs on the connection's task, not the core's, so
//! the hashing of many submissions proceeds in parallel.

use std::sync::Arc;

use protocol::JobDefinition;
use protocol::id::validate_name;
use protocol::messages::{ErrorBody, ErrorCode};

use crate::core::Submit;

/// Highest priority magnitude accepted.
pub const MAX_PRIORITY: i32 = 1_000_000;
/// Most retries a submission may ask for.
pub const MAX_RETRIES: u32 = 100;

/// Validates a submission and builds the core's command.
pub fn prepare(
    queue: &str,
    definition: JobDefinition,
    namespace: Option<String>,
    priority: Option<i32>,
    force: bool,
    retries: Option<u32>,
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
    let definition = definition.normalize().map_err(|e| ErrorBody::invalid(&e))?;
    let job = definition.job_id();
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
