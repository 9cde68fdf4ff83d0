//! The Kubernetes manifests in `k8s/`: every object parses into its typed Kubernetes (or KEDA)
//! form without losing a field, and the references between them hold: selectors and labels,
//! service ports, secret names and keys, the worker's broker URL and drain deadline, and the
//! probe and scaling paths, which a real broker must answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::common::TestBroker;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Removes nulls and empty objects, so that a typed round trip compares equal.
fn prune(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), prune(v)))
                .filter(|(_, v)| !matches!(v, Value::Object(m) if m.is_empty()))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(prune).collect()),
        other => other.clone(),
    }
}

/// Parses `v` as `T` and checks that nothing was dropped (an unknown or misspelt field would be).
fn typed<T: DeserializeOwned + serde::Serialize>(v: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = prune(&serde_json::to_value(&t).unwrap());
    assert_eq!(back, prune(v), "{what}: a field is unknown to the Kubernetes API (misspelt?)");
    t
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kustomization {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<Patch>,
    #[serde(default)]
    labels: Vec<Value>,
    #[serde(default)]
    images: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObject {
    api_version: String,
    kind: String,
    metadata: Value,
    spec: ScaledObjectSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObjectSpec {
    #[serde(default)]
    scale_target_ref: Option<ScaleTargetRef>,
    #[serde(default)]
    min_replica_count: Option<u32>,
    #[serde(default)]
    max_replica_count: Option<u32>,
    #[serde(default)]
    polling_interval: Option<u32>,
    #[serde(default)]
    cooldown_period: Option<u32>,
    triggers: Vec<Trigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleTargetRef {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Trigger {
    #[serde(rename = "type")]
    kind: String,
    metadata: BTreeMap<String, String>,
    authentication_ref: Option<ScaleTargetRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TriggerAuthentication {
    api_version: String,
    kind: String,
    metadata: Value,
    spec: TriggerAuthSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TriggerAuthSpec {
    secret_target_ref: Vec<SecretTargetRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTargetRef {
    parameter: String,
    name: String,
    key: String,
}

/// Everything in a kustomization, by kind.
#[derive(Default)]
struct Objects {
    services: Vec<Service>,
    statefulsets: Vec<StatefulSet>,
    deployments: Vec<Deployment>,
    secrets: Vec<Secret>,
    config_maps: Vec<ConfigMap>,
    scaled: Vec<ScaledObject>,
    trigger_auths: Vec<TriggerAuthentication>,
}

fn load(dir: &Path, objects: &mut Objects) -> Kustomization {
    let k: Kustomization = serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
        .unwrap_or_else(|e| panic!("{}/kustomization.yaml: {e}", dir.display()));
    assert_eq!(k.kind, "Kustomization");
    for r in &k.resources {
        let path = dir.join(r);
        if path.is_dir() {
            load(&path, objects);
            continue;
        }
        for doc in documents(&path) {
            let what = format!("{r}: {} {}", doc["kind"], doc["metadata"]["name"]);
            match doc["kind"].as_str().unwrap_or_default() {
                "Service" => objects.services.push(typed(&doc, &what)),
                "StatefulSet" => objects.statefulsets.push(typed(&doc, &what)),
                "Deployment" => objects.deployments.push(typed(&doc, &what)),
                "Secret" => objects.secrets.push(typed(&doc, &what)),
                "ConfigMap" => objects.config_maps.push(typed(&doc, &what)),
                "ScaledObject" => objects.scaled.push(serde_json::from_value(doc).expect(&what)),
                "TriggerAuthentication" => objects.trigger_auths.push(serde_json::from_value(doc).expect(&what)),
                other => panic!("{what}: unexpected kind {other}"),
            }
        }
    }
    k
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn pod(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("a pod spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

/// The value of `--flag=value` in a container's args.
fn flag(c: &Container, name: &str) -> Option<String> {
    c.args.iter().flatten().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
}

/// Every (secret, key) a pod spec refers to.
fn secret_refs(spec: &PodSpec) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        for e in c.env.iter().flatten() {
            if let Some(r) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                out.push((r.name.clone(), Some(r.key.clone())));
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(s) = &v.secret {
            out.push((s.secret_name.clone().unwrap_or_default(), None));
        }
    }
    out
}

fn secret_has(objects: &Objects, name: &str, key: Option<&str>) -> bool {
    objects.secrets.iter().any(|s| {
        name_of(&s.metadata) == name
            && key.is_none_or(|k| {
                s.string_data.as_ref().is_some_and(|d| d.contains_key(k))
                    || s.data.as_ref().is_some_and(|d| d.contains_key(k))
            })
    })
}

#[tokio::test]
async fn the_manifests_parse_and_reference_each_other_and_what_the_broker_serves() {
    let mut o = Objects::default();
    let base = load(&k8s_dir().join("base"), &mut o);
    assert!(!base.labels.is_empty() && !base.images.is_empty());
    let b = TestBroker::start();
    // /readyz says 503 while the log is recovered; wait for the broker to be ready first.
    let started = std::time::Instant::now();
    while reqwest::get(b.url("/readyz")).await.unwrap().status() != 200 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the broker never became ready");
        tokio::task::yield_now().await;
    }

    // Broker: StatefulSet behind its Service, with probes the broker answers.
    let [service] = &o.services[..] else { panic!("one service") };
    let [broker] = &o.statefulsets[..] else { panic!("one broker statefulset") };
    let bspec = broker.spec.as_ref().unwrap();
    assert_eq!(bspec.replicas, Some(1), "one broker per data directory");
    assert_eq!(bspec.service_name.as_deref(), Some(name_of(&service.metadata)));
    let labels = bspec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let selector = bspec.selector.match_labels.clone().unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "selector matches the pod labels");
    let service_selector = service.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(service_selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "service selects the broker pods");
    let bpod = pod(&bspec.template);
    let bc = container(bpod, "broker");
    let port_names: Vec<&str> = bc.ports.iter().flatten().filter_map(|p| p.name.as_deref()).collect();
    let sport = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match sport.target_port.as_ref().unwrap() {
        IntOrString::String(name) => assert!(port_names.contains(&name.as_str()), "target port {name} exists"),
        IntOrString::Int(n) => assert!(bc.ports.iter().flatten().any(|p| p.container_port == *n)),
    }
    let listen = flag(bc, "listen").expect("--listen");
    let container_port = bc.ports.as_ref().unwrap()[0].container_port;
    assert!(listen.ends_with(&format!(":{container_port}")), "{listen} serves the container port");
    for probe in [&bc.readiness_probe, &bc.liveness_probe, &bc.startup_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        assert_eq!(get.port, IntOrString::String("http".into()));
        let path = get.path.as_deref().unwrap();
        let r = reqwest::get(b.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "the broker answers the probe path {path}");
    }
    let data = flag(bc, "data-dir").unwrap();
    assert!(bc.volume_mounts.iter().flatten().any(|m| m.mount_path == data), "the data dir is on the volume");
    let claims = bspec.volume_claim_templates.as_ref().unwrap();
    for m in bc.volume_mounts.iter().flatten() {
        let from_claim = claims.iter().any(|c| c.metadata.name.as_deref() == Some(m.name.as_str()));
        let from_volume = bpod.volumes.iter().flatten().any(|v| v.name == m.name);
        assert!(from_claim || from_volume, "volume {} is defined", m.name);
    }
    for token in ["client-token-file", "worker-token-file"] {
        let path = flag(bc, token).unwrap();
        let mount = bc.volume_mounts.iter().flatten().find(|m| path.starts_with(&m.mount_path)).expect("token mount");
        let vol = bpod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
        let secret = vol.secret.as_ref().unwrap().secret_name.as_deref().unwrap();
        let key = path.rsplit('/').next().unwrap();
        assert!(secret_has(&o, secret, Some(key)), "secret {secret} has {key}");
    }
    assert_eq!(bpod.security_context.as_ref().unwrap().run_as_non_root, Some(true), "the broker is not root");

    // Workers: point at the service, drain within the grace period, secrets exist.
    let [worker] = &o.deployments[..] else { panic!("one worker deployment") };
    let wspec = worker.spec.as_ref().unwrap();
    let wlabels = wspec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert!(wspec.selector.match_labels.clone().unwrap().iter().all(|(k, v)| wlabels.get(k) == Some(v)));
    let wpod = pod(&wspec.template);
    let wc = container(wpod, "worker");
    let url = flag(wc, "url").unwrap();
    assert_eq!(url, format!("http://{}:{}", name_of(&service.metadata), sport.port), "the worker finds the broker");
    let drain = humantime::parse_duration(&flag(wc, "drain-timeout").unwrap()).unwrap().as_secs() as i64;
    let grace = wpod.termination_grace_period_seconds.unwrap();
    assert!(grace > drain, "terminationGracePeriodSeconds {grace} covers the drain of {drain} s");
    for (name, key) in secret_refs(wpod).into_iter().chain(secret_refs(bpod)) {
        assert!(secret_has(&o, &name, key.as_deref()), "secret {name} {key:?} exists");
    }
    let queue = flag(wc, "queue").unwrap();
    let work = flag(wc, "data-dir").unwrap();
    let dind = wpod.init_containers.iter().flatten().find(|c| c.name == "docker").expect("the docker sidecar");
    assert_eq!(dind.restart_policy.as_deref(), Some("Always"), "a native sidecar outlives the worker's drain");
    assert!(
        dind.volume_mounts.iter().flatten().any(|m| m.mount_path == work),
        "the Docker daemon sees the job directories at the same path"
    );

    // KEDA: scales that deployment on a path the broker serves, with a token from the Secret.
    let [scaled] = &o.scaled[..] else { panic!("one ScaledObject") };
    assert_eq!(scaled.api_version, "keda.sh/v1alpha1");
    assert_eq!(scaled.kind, "ScaledObject");
    assert_eq!(scaled.spec.scale_target_ref.as_ref().unwrap().name, name_of(&worker.metadata));
    assert_eq!(scaled.spec.min_replica_count, Some(0), "scales from zero");
    assert!(scaled.spec.polling_interval.is_some() && scaled.spec.cooldown_period.is_some());
    let [trigger] = &scaled.spec.triggers[..] else { panic!("one trigger") };
    check_trigger(&b, trigger, &url, &queue, scaled.spec.max_replica_count).await;
    let auth_name = &trigger.authentication_ref.as_ref().unwrap().name;
    let auth =
        o.trigger_auths.iter().find(|a| a.metadata["name"] == auth_name.as_str()).expect("the TriggerAuthentication");
    assert_eq!((auth.api_version.as_str(), auth.kind.as_str()), ("keda.sh/v1alpha1", "TriggerAuthentication"));
    for r in &auth.spec.secret_target_ref {
        assert_eq!(r.parameter, "token");
        assert!(secret_has(&o, &r.name, Some(&r.key)), "secret {} has {}", r.name, r.key);
    }
    assert!(scaled.metadata["name"].is_string());

    // The GPU overlay: its patches are typed objects too, and agree with each other.
    let overlay_dir = k8s_dir().join("overlays/gpu");
    let mut overlay = Objects::default();
    let k = load(&overlay_dir, &mut overlay);
    assert_eq!(overlay.deployments.len(), 1, "the overlay builds on the base");
    let mut gpu_queue = None;
    let mut gpu_trigger = None;
    for p in &k.patches {
        for doc in documents(&overlay_dir.join(&p.path)) {
            match doc["kind"].as_str().unwrap() {
                "Deployment" => {
                    let d: Deployment = typed(&doc, &p.path);
                    assert_eq!(name_of(&d.metadata), name_of(&worker.metadata), "patches the worker");
                    let spec = pod(&d.spec.as_ref().unwrap().template).clone();
                    let c = container(&spec, "worker");
                    assert_eq!(flag(c, "url").unwrap(), url);
                    assert!(flag(c, "gpus").is_some() && flag(c, "tag").is_some());
                    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
                    assert!(limits.contains_key("nvidia.com/gpu"));
                    gpu_queue = flag(c, "queue");
                }
                "ScaledObject" => {
                    let s: ScaledObject = serde_json::from_value(doc).unwrap();
                    assert_eq!(s.metadata["name"], scaled.metadata["name"]);
                    gpu_trigger = Some((s.spec.triggers, s.spec.max_replica_count));
                }
                other => panic!("unexpected patch kind {other}"),
            }
        }
    }
    let (triggers, max) = gpu_trigger.expect("the overlay scales the GPU queue");
    check_trigger(&b, &triggers[0], &url, &gpu_queue.expect("the GPU queue"), max).await;
}

/// The trigger reads the scale endpoint of `queue` on the broker's service; the path and
/// query are answered by a real broker with the value KEDA reads.
async fn check_trigger(b: &TestBroker, trigger: &Trigger, broker_url: &str, queue: &str, max: Option<u32>) {
    assert_eq!(trigger.kind, "metrics-api");
    let url = &trigger.metadata["url"];
    let path = url.strip_prefix(broker_url).unwrap_or_else(|| panic!("{url} is on {broker_url}"));
    assert!(path.starts_with(&format!("/q/{queue}/scale?")), "{path} scales the worker's queue {queue}");
    assert!(path.contains(&format!("max={}", max.unwrap())), "{path} caps at maxReplicaCount");
    let answer: Value = reqwest::get(b.url(path)).await.unwrap().json().await.unwrap();
    let location = &trigger.metadata["valueLocation"];
    assert!(answer[location.as_str()].is_u64(), "{answer} has {location}");
    assert_eq!(trigger.metadata["authMode"], "bearer");
    assert_eq!(trigger.metadata["targetValue"], "1");
}

/// nats-server, where the tests have one (scripts/test.sh sets CQ_NATS_SERVER).
fn nats_server() -> Option<PathBuf> {
    std::env::var_os("CQ_NATS_SERVER").map(PathBuf::from).or_else(|| {
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/bin/nats-server");
        local.exists().then_some(local)
    })
}

#[test]
fn the_cluster_overlay_runs_brokers_on_a_nats_cluster_they_can_use() {
    let dir = k8s_dir().join("overlays/cluster");
    let mut o = Objects::default();
    let k = load(&dir, &mut o);
    let base_broker = o.statefulsets.iter().find(|s| name_of(&s.metadata) == "cq-broker").expect("the base broker");

    // NATS: a StatefulSet under a headless Service, its config from a ConfigMap.
    let nats = o.statefulsets.iter().find(|s| name_of(&s.metadata) == "cq-nats").expect("a NATS StatefulSet");
    let nspec = nats.spec.as_ref().unwrap();
    let servers = nspec.replicas.unwrap();
    assert_eq!(servers, 3, "three NATS servers, so a replicated log survives losing one");
    let nsvc_name = nspec.service_name.as_deref().unwrap();
    let nsvc = o.services.iter().find(|s| name_of(&s.metadata) == nsvc_name).expect("NATS's Service");
    let nsvc_spec = nsvc.spec.as_ref().unwrap();
    assert_eq!(nsvc_spec.cluster_ip.as_deref(), Some("None"), "headless, so each server has a name");
    let port = |name: &str| nsvc_spec.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).unwrap().port;
    let npod = pod(&nspec.template);
    let nc = container(npod, "nats");
    let config_arg = nc.args.iter().flatten().find_map(|a| a.strip_prefix("--config=")).expect("--config");
    let (config_dir, config_file) = config_arg.rsplit_once('/').unwrap();
    let mount = nc.volume_mounts.iter().flatten().find(|m| m.mount_path == config_dir).expect("the config mount");
    let volume = npod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    let map_name = volume.config_map.as_ref().unwrap().name.as_str();
    let map = o.config_maps.iter().find(|m| name_of(&m.metadata) == map_name).expect("the NATS ConfigMap");
    let conf = &map.data.as_ref().unwrap()[config_file];
    for setting in ["sync_interval: always", "max_payload: 8MB"] {
        assert!(conf.contains(setting), "the NATS config has `{setting}` (docs/operations.md says why)");
    }
    let store = conf.lines().find_map(|l| l.trim().strip_prefix("store_dir: ")).unwrap();
    assert!(nc.volume_mounts.iter().flatten().any(|m| m.mount_path == store), "JetStream stores on the volume");
    let pod_names: Vec<String> = (0..servers).map(|i| format!("{}-{i}.{nsvc_name}", name_of(&nats.metadata))).collect();
    for name in &pod_names {
        assert!(conf.contains(&format!("nats-route://{name}:{}", port("cluster"))), "a route to {name}");
    }
    // The config is one nats-server accepts.
    if let Some(bin) = nats_server() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(config_file);
        std::fs::write(&path, conf).unwrap();
        let out = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .arg("-t")
            .env("POD_NAME", "cq-nats-0")
            .output()
            .unwrap();
        assert!(out.status.success(), "nats-server refuses the config: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The brokers: three, on every NATS server, with S3 for blobs and the secrets they name.
    let [patch] = &k.patches[..] else { panic!("one patch") };
    let [doc] = &documents(&dir.join(&patch.path))[..] else { panic!("one object in {}", patch.path) };
    let broker: StatefulSet = typed(doc, &patch.path);
    assert_eq!(name_of(&broker.metadata), name_of(&base_broker.metadata), "patches the base broker");
    let bspec = broker.spec.as_ref().unwrap();
    assert_eq!(bspec.replicas, Some(3), "three brokers sharing the shards");
    let bpod = pod(&bspec.template);
    let bc = container(bpod, "broker");
    let urls = flag(bc, "nats").expect("--nats");
    let want: Vec<String> = pod_names.iter().map(|n| format!("nats://{n}:{}", port("client"))).collect();
    assert_eq!(urls.split(',').collect::<Vec<_>>(), want, "the brokers know every NATS server");
    let replicas: i32 = flag(bc, "nats-replicas").unwrap().parse().unwrap();
    assert!(replicas <= servers, "{replicas} replicas on {servers} servers");
    assert!(flag(bc, "s3-bucket").is_some(), "cluster mode needs shared blob storage");
    let shards: u32 = flag(bc, "shards").expect("--shards").parse().unwrap();
    assert!(shards >= 3, "every broker of the three serves a share: {shards} shards");
    let env = |name: &str| bc.env.iter().flatten().find(|e| e.name == name);
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(env(var).is_some(), "{var} for S3");
    }
    for (name, key) in secret_refs(bpod) {
        assert!(secret_has(&o, &name, key.as_deref()), "secret {name} {key:?} exists");
    }
    // Kubernetes expands $(VAR) in args from the container's env.
    for arg in bc.args.iter().flatten() {
        for var in arg.split("$(").skip(1).filter_map(|rest| rest.split_once(')').map(|(v, _)| v)) {
            assert!(env(var).is_some(), "{arg} uses ${var}, which the container's env defines");
        }
    }
    // The base's flags are all still there (a patch replaces the whole list).
    let base_args = container(pod(&base_broker.spec.as_ref().unwrap().template), "broker").args.clone().unwrap();
    for a in &base_args {
        assert!(bc.args.iter().flatten().any(|b| b == a), "the patch keeps {a}");
    }
    // Standbys answer /readyz with 503, so the base's readiness probe keeps the Service on the owner.
    let probe = container(pod(&base_broker.spec.as_ref().unwrap().template), "broker").readiness_probe.as_ref();
    assert_eq!(probe.unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
    assert!(bc.readiness_probe.is_none(), "the patch keeps the base's probe");
}
