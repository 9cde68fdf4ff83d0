//! Files on the command line: `cq submit --input NAME=@PATH` uploads inputs before submitting,
//! `cq outputs JOB` downloads a job's outputs; both show a progress bar for large files.

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use protocol::definition::{DataRef, JobDefinition, validate_relative_path};
use protocol::{JobState, JobView};
use worker::blobs::{BlobClient, Digested};

use crate::OutputsArgs;
use crate::client::Client;

/// Files at least this large get a progress bar.
const PROGRESS_FROM: u64 = 4 << 20;

fn bar(size: u64, what: &str) -> Option<ProgressBar> {
    if size < PROGRESS_FROM {
        return None;
    }
    // Draws on stderr, and only when it is a terminal.
    let bar = ProgressBar::new(size);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    Some(bar)
}

/// Adds `--input` arguments to a definition, uploading local files first.
pub async fn add_inputs(
    definition: &mut JobDefinition,
    inputs: &[String],
    client: &Client,
    token: Option<String>,
) -> Result<()> {
    if inputs.is_empty() {
        return Ok(());
    }
    let blobs = BlobClient::new(&client.reachable().await?, token)?.retrying_for(crate::client::UNAVAILABLE_RETRY_FOR);
    for arg in inputs {
        let Some((name, value)) = arg.split_once('=') else {
            bail!("--input wants NAME=@PATH or NAME=TEXT, got `{arg}`");
        };
        validate_relative_path(name).map_err(|e| anyhow::anyhow!("--input `{name}`: {e}"))?;
        let data = match value.strip_prefix('@') {
            Some(path) => {
                let path = Path::new(path);
                let meta = std::fs::metadata(path).with_context(|| format!("--input {name}: {}", path.display()))?;
                if !meta.is_file() {
                    bail!("--input {name}: {} is not a file", path.display());
                }
                let Digested { sha256, size } = blobs
                    .upload_file(path, bar(meta.len(), name))
                    .await
                    .with_context(|| format!("uploading {}", path.display()))?;
                DataRef::Blob { sha256, size }
            }
            None => DataRef::Text { value: value.to_string() },
        };
        definition.inputs.insert(name.to_string(), data);
    }
    Ok(())
}

/// `cq outputs JOB [-o DIR]`.
pub async fn outputs(args: OutputsArgs) -> Result<ExitCode> {
    let client = Client::new(&args.conn.url, args.conn.token.clone())?;
    let id = client.resolve(&args.job).await?;
    let view: JobView = serde_json::from_value(client.get(&format!("/j/{id}")).await?)?;
    if view.outputs.is_empty() {
        let short = id.short();
        if view.state == JobState::Finished {
            eprintln!("cq: no outputs: {}", crate::commands::describe_end(&view));
        } else {
            eprintln!(
                "cq: job {short} has no outputs yet: it is {}; follow it with `cq logs -f{} {short}`",
                crate::commands::state_word(view.state),
                client.url_flag()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    for only in &args.only {
        if !view.outputs.iter().any(|o| &o.path == only) {
            let names: Vec<&str> = view.outputs.iter().map(|o| o.path.as_str()).collect();
            bail!("job {id} has no output `{only}`; it has: {}", names.join(", "));
        }
    }
    // The broker that just answered, of those --url names.
    let blobs = BlobClient::new(client.base(), args.conn.token)?.retrying_for(crate::client::UNAVAILABLE_RETRY_FOR);
    for output in &view.outputs {
        if !args.only.is_empty() && !args.only.contains(&output.path) {
            continue;
        }
        let dest = safe_join(&args.output_dir, &output.path)?;
        if dest.exists() && !args.overwrite {
            let existing = worker::blobs::hash_file(&dest).await?;
            if existing.sha256 == output.sha256 {
                eprintln!("{} is up to date", dest.display());
                continue;
            }
            bail!("{} exists and differs; pass --overwrite to replace it", dest.display());
        }
        let expected = Digested { sha256: output.sha256.clone(), size: output.size };
        let encoded: Vec<String> = output
            .path
            .split('/')
            .map(|p| percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC).to_string())
            .collect();
        blobs
            .download(
                &format!("/j/{id}/outputs/{}", encoded.join("/")),
                &dest,
                Some(&expected),
                bar(output.size, &output.path),
            )
            .await?;
        eprintln!("{} ({} bytes)", dest.display(), output.size);
    }
    Ok(ExitCode::SUCCESS)
}

/// `dir/path`, refusing paths that would leave `dir` (the broker validates them too).
fn safe_join(dir: &Path, path: &str) -> Result<PathBuf> {
    validate_relative_path(path).map_err(|e| anyhow::anyhow!("output `{path}`: {e}"))?;
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("output `{path}` is not a plain relative path");
    }
    Ok(dir.join(rel))
}
