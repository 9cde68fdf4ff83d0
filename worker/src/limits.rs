//! What a job may use on this worker, set by the worker's owner and not by the job: default and
//! largest memory, CPUs and shared memory, the network containers join, the hosts URL inputs may
//! come from, and how widely `/cache` is shared.

use protocol::definition::{ByteSize, JobDefinition};

use crate::docker::JobError;
use crate::fetch::FetchPolicy;

/// Memory a job gets when it does not ask (it may ask for more, up to the maximum).
pub const DEFAULT_MEMORY: u64 = 2 << 30;
/// Largest `/dev/shm` a job may ask for unless the worker says otherwise.
pub const DEFAULT_MAX_SHM: u64 = 2 << 30;

/// The network job containers join.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum JobNetwork {
    /// No network at all.
    None,
    /// The worker's `cq-jobs` bridge: outbound internet, no traffic between containers, and
    /// (where the worker may install firewall rules) nothing to the host.
    #[default]
    Isolated,
    /// A Docker network the worker's owner made; its rules are the owner's.
    Named(String),
}

impl JobNetwork {
    /// `none`, `isolated`, or the name of a Docker network.
    pub fn parse(text: &str) -> JobNetwork {
        match text {
            "none" => JobNetwork::None,
            "isolated" | "" => JobNetwork::Isolated,
            name => JobNetwork::Named(name.to_string()),
        }
    }
}

/// Who shares a `/cache` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheScope {
    /// Jobs of the same queue (so one queue's jobs cannot plant files another queue's run).
    #[default]
    Queue,
    /// Every job of this worker.
    Worker,
}

/// The worker's ceilings and policies for jobs.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory of a job that does not ask; `None`: no limit.
    pub default_memory: Option<u64>,
    /// Most memory a job may ask for; `None`: the host's memory.
    pub max_memory: Option<u64>,
    /// Most CPUs a job may ask for; `None`: the host's CPUs.
    pub max_cpus: Option<f64>,
    /// Largest `/dev/shm` a job may ask for.
    pub max_shm: u64,
    pub network: JobNetwork,
    pub cache: CacheScope,
    pub fetch: FetchPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_memory: Some(DEFAULT_MEMORY),
            max_memory: None,
            max_cpus: None,
            max_shm: DEFAULT_MAX_SHM,
            network: JobNetwork::default(),
            cache: CacheScope::default(),
            fetch: FetchPolicy::default(),
        }
    }
}

/// What a container gets: memory in bytes, CPUs, shm in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Granted {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub shm: Option<u64>,
}

impl Limits {
    /// Checks `def` against the ceilings (the host's size where the owner set none) and says
    /// what the container gets; a job asking for more than this worker allows is refused.
    pub fn grant(&self, def: &JobDefinition) -> Result<Granted, JobError> {
        let r = def.resources.clone().unwrap_or_default();
        let bytes = |b: &Option<ByteSize>| match b {
            Some(ByteSize::Bytes(n)) => Some(*n),
            _ => None,
        };
        let max_memory = self.max_memory.or_else(host_memory);
        let max_cpus = self.max_cpus.or_else(|| std::thread::available_parallelism().ok().map(|n| n.get() as f64));
        let memory = bytes(&r.memory).or(self.default_memory.map(|d| max_memory.map_or(d, |m| d.min(m))));
        if let (Some(asked), Some(max)) = (bytes(&r.memory), max_memory)
            && asked > max
        {
            return Err(refused("memory", &format_bytes(asked), &format_bytes(max)));
        }
        if let (Some(asked), Some(max)) = (r.cpus, max_cpus)
            && asked > max
        {
            return Err(refused("cpus", &asked.to_string(), &max.to_string()));
        }
        let shm = bytes(&r.shm_size);
        if let Some(asked) = shm
            && asked > self.max_shm
        {
            return Err(refused("shmSize", &format_bytes(asked), &format_bytes(self.max_shm)));
        }
        Ok(Granted { memory, cpus: r.cpus, shm })
    }
}

fn refused(what: &str, asked: &str, max: &str) -> JobError {
    JobError::user(format!(
        "the job asks for resources.{what} {asked}, above this worker's maximum of {max}; \
         ask for less, or run it on a worker that allows more"
    ))
}

fn format_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n => format!("{n} bytes"),
    }
}

/// The host's memory, from `/proc/meminfo` (Linux); `None` elsewhere.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(resources: &str) -> JobDefinition {
        let text = format!(r#"{{"image":"busybox","resources":{resources}}}"#);
        protocol::definition::parse_json::<JobDefinition>(text.as_bytes()).unwrap().normalize().unwrap()
    }

    #[test]
    fn ceilings() {
        let limits = Limits { max_memory: Some(4 << 30), max_cpus: Some(2.0), max_shm: 1 << 30, ..Default::default() };
        let g = limits.grant(&def("{}")).unwrap();
        assert_eq!(g, Granted { memory: Some(DEFAULT_MEMORY), cpus: None, shm: None }, "a default memory limit");
        let g = limits.grant(&def(r#"{"memory":"3g","cpus":1.5,"shmSize":"512m"}"#)).unwrap();
        assert_eq!(g, Granted { memory: Some(3 << 30), cpus: Some(1.5), shm: Some(512 << 20) });
        for (asked, field) in
            [(r#"{"memory":"5g"}"#, "memory"), (r#"{"cpus":3}"#, "cpus"), (r#"{"shmSize":"64g"}"#, "shmSize")]
        {
            let e = limits.grant(&def(asked)).unwrap_err();
            assert!(e.message.contains(&format!("resources.{field}")) && !e.retryable, "{e:?}");
        }
        let small = Limits { max_memory: Some(1 << 30), ..Default::default() };
        assert_eq!(small.grant(&def("{}")).unwrap().memory, Some(1 << 30), "the default never exceeds the maximum");
    }
}
