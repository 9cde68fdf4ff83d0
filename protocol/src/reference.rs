//! Translation of job definitions written for the reference system (metapages compute-queues)
//! into cq's own, field by field. Pure: no IO, no clock. Every refusal names the field and says
//! why. Used by `POST /q/{queue}` and by the page for definitions from its URL hash and from
//! metaframe inputs (see `docs/embedding.md`, "Moving from the reference system").

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::definition::{
    BuildSpec, ByteSize, CommandLine, DataRef, DefinitionError, DurationSpec, GitSource, JobDefinition, Resources,
    url_has_credentials,
};

/// The reference's default namespace. It is shared by every client and never supersedes, which
/// is what a cq submission without a namespace does.
pub const DEFAULT_NAMESPACE: &str = "_";

/// A submission to the reference's `POST /q/{queue}`: its `EnqueueJob`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Submission {
    /// The client's idea of the job id; cq derives its own from the content.
    #[serde(default)]
    pub id: Option<String>,
    pub definition: Definition,
    #[serde(default)]
    pub control: Option<Control>,
    /// Debug logging in the reference's worker; cq's worker logs the same either way.
    #[serde(default)]
    pub debug: Option<bool>,
}

/// The reference's `DockerJobControlConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Control {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub callbacks: Option<serde_json::Value>,
    /// Declared by the reference but never read there; accepted and ignored.
    #[serde(default)]
    pub max_duration: Option<serde_json::Value>,
    /// Declared by the reference but never read there; accepted and ignored.
    #[serde(default)]
    pub outputs: Option<serde_json::Value>,
}

/// The reference's job definition (`DockerJobDefinitionInputRefs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Definition {
    /// The reference's format version; nothing depends on it.
    #[serde(default)]
    pub v: Option<serde_json::Value>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub build: Option<Build>,
    #[serde(default)]
    pub command: Option<CommandLine>,
    #[serde(default)]
    pub entrypoint: Option<CommandLine>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub shm_size: Option<ByteSize>,
    #[serde(default)]
    pub inputs: BTreeMap<String, RefData>,
    #[serde(default)]
    pub config_files: BTreeMap<String, RefData>,
    #[serde(default)]
    pub max_duration: Option<DurationSpec>,
    /// Never enforced by the reference's workers; dropped, because cq would make the job wait
    /// for a worker carrying them.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub requirements: Option<Requirements>,
}

/// The reference's `DockerJobImageBuild`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Build {
    /// URL of the build context: a git or GitHub repository or an archive.
    #[serde(default)]
    pub context: Option<String>,
    /// Sub-directory of the context to build in.
    #[serde(default)]
    pub build_context: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// `KEY=value` strings.
    #[serde(default)]
    pub build_args: Vec<String>,
    #[serde(default)]
    pub platform: Option<String>,
}

/// The reference's `requirements`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirements {
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub gpus: Option<u32>,
    #[serde(default)]
    pub memory: Option<ByteSize>,
    #[serde(default)]
    pub max_duration: Option<DurationSpec>,
}

/// The reference's `DataRef`: `{value, type?, hash?}`, `type` defaulting to `utf8`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefData {
    pub value: serde_json::Value,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// SHA-256 of the bytes (hex); checked after download for `url` refs.
    #[serde(default)]
    pub hash: Option<String>,
}

/// A translated submission: cq's definition (normalised) and the namespace to submit in.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub definition: JobDefinition,
    /// `None` for the reference's default namespace `_`.
    pub namespace: Option<String>,
}

/// Translates a whole submission. Field paths in errors start with `definition.` or `control.`.
pub fn translate_submission(submission: Submission) -> Result<Translated, DefinitionError> {
    let mut namespace = None;
    if let Some(control) = submission.control {
        if control.callbacks.is_some() {
            return Err(err(
                "control.callbacks",
                "cq calls no webhooks; follow the job with `GET /j/{id}/events` or a websocket instead",
            ));
        }
        namespace = control.namespace.filter(|ns| ns != DEFAULT_NAMESPACE);
    }
    let definition = translate(submission.definition).map_err(|mut e| {
        e.field = if e.field.is_empty() { "definition".into() } else { format!("definition.{}", e.field) };
        e
    })?;
    Ok(Translated { definition, namespace })
}

/// Translates one definition into cq's, normalised. Field paths in errors are the reference's.
pub fn translate(def: Definition) -> Result<JobDefinition, DefinitionError> {
    let Definition {
        v: _,
        image,
        build,
        command,
        entrypoint,
        workdir,
        env,
        shm_size,
        inputs,
        config_files,
        max_duration,
        tags: _,
        requirements,
    } = def;
    let build = build.map(translate_build).transpose()?;
    let command = command.map(|c| translate_command("command", c, &env)).transpose()?;
    let entrypoint = entrypoint.map(|c| translate_command("entrypoint", c, &env)).transpose()?;

    let mut cq_inputs = BTreeMap::new();
    for (name, data) in inputs {
        // Metaframe input names may start with `/`; the reference drops it too.
        let path = name.trim_start_matches('/').to_string();
        let field = format!("inputs.{name}");
        cq_inputs.insert(path, translate_data(&field, data)?);
    }
    for (name, data) in config_files {
        let field = format!("configFiles.{name}");
        if name.starts_with('/') {
            return Err(err(
                field,
                "is an absolute path, which the reference bind-mounts at that path; cq mounts only /inputs, \
                 /outputs and the cache, so give it a relative name (it lands in /inputs/<name>) and point \
                 the program there",
            ));
        }
        let path = name.trim_start_matches("./").to_string();
        if cq_inputs.contains_key(&path) {
            return Err(err(field, format!("`{path}` is also an input; both would land in /inputs/{path}")));
        }
        cq_inputs.insert(path, translate_data(&field, data)?);
    }

    let mut resources = Resources { shm_size, ..Resources::default() };
    let mut max_duration = max_duration;
    if let Some(r) = requirements {
        resources.cpus = r.cpus;
        resources.gpus = r.gpus;
        resources.memory = r.memory;
        // The reference ignores `requirements.maxDuration`; its docs say it is honoured, so cq
        // honours it when the top-level field is absent.
        if max_duration.is_none() {
            max_duration = r.max_duration;
        }
    }
    let resources = (resources != Resources::default()).then_some(resources);

    let definition = JobDefinition {
        image,
        build,
        command,
        entrypoint,
        workdir,
        env,
        inputs: cq_inputs,
        max_duration,
        resources,
        tags: Vec::new(),
    };
    definition.normalize().map_err(|mut e| {
        // The checks that remain are cq's, on fields whose names cq changed.
        e.field = match e.field.as_str() {
            "resources.shmSize" => "shmSize".into(),
            f if f.starts_with("resources.") => f.replacen("resources.", "requirements.", 1),
            "build.git.url" | "build.tarball" => "build.context".into(),
            "build.git.dir" => "build.buildContext".into(),
            _ => e.field,
        };
        e
    })
}

fn err(field: impl Into<String>, message: impl Into<String>) -> DefinitionError {
    DefinitionError { field: field.into(), message: message.into(), malformed: false }
}

/// A data ref: `utf8` (the default) is text, `base64` bytes, `json` a JSON value, `url` a
/// download verified against `hash` when it is a SHA-256.
fn translate_data(field: &str, data: RefData) -> Result<DataRef, DefinitionError> {
    let text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => Ok(s),
        // The reference's page sends numbers as their text.
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(err(field, "`value` must be a string for this type")),
    };
    match data.kind.as_deref().unwrap_or("utf8") {
        "utf8" => Ok(DataRef::Text { value: text(data.value)? }),
        "base64" => Ok(DataRef::Base64 { value: text(data.value)? }),
        "json" => Ok(DataRef::Json { value: data.value }),
        "url" => {
            let sha256 = data.hash.filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            Ok(DataRef::Url { url: text(data.value)?, sha256: sha256.map(|h| h.to_ascii_lowercase()), size: None })
        }
        "key" => Err(err(
            field,
            "a `key` ref names a file in the reference system's own store, which cq cannot read; upload \
             the file to cq and use a `blob` ref, or give its URL as a `url` ref",
        )),
        other => Err(err(field, format!("unknown data ref type `{other}`; use utf8, base64, json or url"))),
    }
}

fn translate_build(b: Build) -> Result<BuildSpec, DefinitionError> {
    let mut build_args = BTreeMap::new();
    for (i, arg) in b.build_args.iter().enumerate() {
        let Some((k, v)) = arg.split_once('=') else {
            return Err(err(
                format!("build.buildArgs.{i}"),
                format!("`{arg}` has no value; write KEY=value (cq passes no environment to builds)"),
            ));
        };
        build_args.insert(k.trim().to_string(), v.to_string());
    }
    let mut spec = BuildSpec {
        dockerfile: b.dockerfile,
        filename: b.filename,
        target: b.target,
        platform: b.platform,
        build_args,
        ..BuildSpec::default()
    };
    let sub_dir =
        b.build_context.map(|d| d.trim_matches('/').trim_start_matches("./").to_string()).filter(|d| !d.is_empty());
    match b.context {
        None => {
            if sub_dir.is_some() {
                return Err(err("build.buildContext", "needs a `context` to be a sub-directory of"));
            }
        }
        Some(url) => match context_source(url.trim())? {
            Context::Git(mut git) => {
                if let Some(sub) = sub_dir {
                    git.dir = Some(match git.dir.take() {
                        Some(d) => format!("{d}/{sub}"),
                        None => sub,
                    });
                }
                spec.git = Some(git);
            }
            Context::Tarball(url) => {
                if sub_dir.is_some() {
                    return Err(err(
                        "build.buildContext",
                        "Docker builds a remote archive whole, so cq cannot build in one of its \
                         sub-directories; give the git repository as `context` instead",
                    ));
                }
                spec.tarball = Some(url);
            }
        },
    }
    Ok(spec)
}

enum Context {
    Git(GitSource),
    Tarball(String),
}

/// What a reference build context URL points at: GitHub repository pages (`/tree/<ref>[/dir]`,
/// `/commit/<sha>`) and archive links become git sources; other `.git` URLs are git; `.tar*`
/// and `.tgz` URLs are tarballs.
fn context_source(url: &str) -> Result<Context, DefinitionError> {
    let field = "build.context";
    if url.contains("${") {
        return Err(err(
            field,
            format!("`{url}` still holds a `${{…}}` placeholder; set it as a URL hash parameter or write the value"),
        ));
    }
    if url_has_credentials(url) {
        return Err(err(
            field,
            "carries credentials, which cq refuses: a job record is stored and shown to every watcher; \
             give the Docker daemon access to the repository instead",
        ));
    }
    let lower = url.to_ascii_lowercase();
    let github = ["https://github.com/", "http://github.com/", "https://www.github.com/"]
        .iter()
        .find_map(|prefix| lower.starts_with(prefix).then(|| &url[prefix.len()..]));
    if let Some(path) = github {
        let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').collect();
        if segments.len() < 2 || segments[0].is_empty() || segments[1].is_empty() {
            return Err(err(field, format!("`{url}` does not name a GitHub repository (github.com/<owner>/<repo>)")));
        }
        let repo = segments[1].trim_end_matches(".git");
        let mut git =
            GitSource { url: format!("https://github.com/{}/{repo}.git", segments[0]), ..GitSource::default() };
        let archive_ref =
            |file: &str| [".tar.gz", ".zip", ".tgz"].iter().find_map(|ext| file.strip_suffix(ext)).map(str::to_string);
        match &segments[2..] {
            [] => {}
            ["tree", r, dir @ ..] => {
                git.git_ref = Some(r.to_string());
                if !dir.is_empty() {
                    git.dir = Some(dir.join("/"));
                }
            }
            ["commit", sha] => git.git_ref = Some(sha.to_string()),
            ["archive", "refs", "heads" | "tags", file] | ["archive", file] => match archive_ref(file) {
                Some(r) => git.git_ref = Some(r),
                None => return Err(err(field, format!("`{url}` is not a GitHub archive (.zip or .tar.gz)"))),
            },
            _ => {
                return Err(err(
                    field,
                    format!(
                        "`{url}` is a GitHub page cq cannot build from; give the repository, /tree/<ref> or /commit/<sha>"
                    ),
                ));
            }
        }
        return Ok(Context::Git(git));
    }
    let path = lower.split(['?', '#']).next().unwrap_or_default();
    if path.ends_with(".git") || lower.starts_with("git@") {
        let (base, r) = match url.split_once('#') {
            Some((base, r)) if !r.is_empty() => (base, Some(r.to_string())),
            _ => (url, None),
        };
        return Ok(Context::Git(GitSource { url: base.to_string(), git_ref: r, dir: None }));
    }
    if [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"].iter().any(|ext| path.ends_with(ext)) {
        return Ok(Context::Tarball(url.to_string()));
    }
    if path.ends_with(".zip") {
        return Err(err(
            field,
            format!(
                "`{url}` is a zip archive, which Docker cannot use as a build context; give a .tar.gz URL or the git repository"
            ),
        ));
    }
    Err(err(
        field,
        format!("cannot tell what `{url}` is; a git repository URL ends in .git, an archive in .tar.gz or .tgz"),
    ))
}

/// A command as the reference runs it: a string is split the way the `shell-quote` package
/// splits it, with `$VAR` and `${VAR}` taken from the job's `env` (empty when unset), except that
/// a string holding shell operators (`&&`, `|`, `;`, `>`, globs …) is passed whole, as one
/// argument, exactly as the reference passes it.
fn translate_command(
    field: &str,
    c: CommandLine,
    env: &BTreeMap<String, String>,
) -> Result<CommandLine, DefinitionError> {
    match c {
        CommandLine::Args(a) => Ok(CommandLine::Args(a)),
        CommandLine::Shell(s) => match split_like_shell_quote(&s, env) {
            Ok(Split::Words(words)) => Ok(CommandLine::Args(words)),
            Ok(Split::HasOperators) => Ok(CommandLine::Args(vec![s])),
            Err(m) => Err(err(field, format!("cannot split `{s}` ({m}); check the quotes"))),
        },
    }
}

enum Split {
    Words(Vec<String>),
    HasOperators,
}

fn split_like_shell_quote(s: &str, env: &BTreeMap<String, String>) -> Result<Split, &'static str> {
    let chars: Vec<char> = s.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    // Reads `$NAME` or `${NAME}` at `i` (just past the `$`) and returns the value and new index.
    let variable = |i: usize| -> (String, usize) {
        if chars.get(i) == Some(&'{') {
            let end = chars[i..].iter().position(|&c| c == '}').map(|p| i + p);
            if let Some(end) = end {
                let name: String = chars[i + 1..end].iter().collect();
                return (env.get(&name).cloned().unwrap_or_default(), end + 1);
            }
            return ("${".into(), i + 1);
        }
        let mut j = i;
        while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        if j == i {
            return ("$".into(), i);
        }
        let name: String = chars[i..j].iter().collect();
        (env.get(&name).cloned().unwrap_or_default(), j)
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                i += 1;
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '*' => return Ok(Split::HasOperators),
            '#' if !in_word => return Ok(Split::HasOperators),
            '\'' => {
                let end = chars[i + 1..].iter().position(|&c| c == '\'').ok_or("an unclosed single quote")?;
                word.extend(&chars[i + 1..i + 1 + end]);
                in_word = true;
                i += end + 2;
            }
            '"' => {
                in_word = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("an unclosed double quote"),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            word.push(chars[i + 1]);
                            i += 2;
                        }
                        Some('$') => {
                            let (value, next) = variable(i + 1);
                            word.push_str(&value);
                            i = next;
                        }
                        Some(&c) => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
            }
            '\\' => {
                if let Some(&next) = chars.get(i + 1) {
                    word.push(next);
                }
                in_word = true;
                i += 2;
            }
            '$' => {
                let (value, next) = variable(i + 1);
                word.push_str(&value);
                in_word = true;
                i = next;
            }
            c => {
                word.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(Split::Words(words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_odd_command_strings_never_panics() {
        let env = BTreeMap::from([("A".to_string(), "x y".to_string())]);
        for s in ["", "'", "\"", "\\", "$", "${", "${A", "a\\", "\"$A\"", "$A", "'$A'", "\"\\", "é ü", "a\"b'c"] {
            let _ = translate_command("command", CommandLine::Shell(s.into()), &env);
        }
        let words = |s: &str| match split_like_shell_quote(s, &env) {
            Ok(Split::Words(w)) => w,
            _ => panic!("{s}"),
        };
        assert_eq!(words("echo \"$A\" $A"), ["echo", "x y", "x y"]);
        assert_eq!(words("a\\ b 'c d'"), ["a b", "c d"]);
        assert!(split_like_shell_quote("echo 'open", &env).is_err());
    }
}
