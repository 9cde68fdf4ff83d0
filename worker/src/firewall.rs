//! Keeping jobs away from the worker's host. Packets from the `cq-jobs` bridge to any address of
//! the host (the bridge's gateway, the host's other interfaces) pass the host's INPUT chain, not
//! Docker's forwarding rules, so Docker's isolation leaves them open. One iptables rule, added
//! once and found again on later starts, rejects them; forwarded traffic (the internet) is left
//! alone. Where the rule cannot be installed (no iptables, no privilege), the worker says so.

use std::process::Command;

/// The comment that marks the rule as cq's, so it is found again and never duplicated.
const RULE_COMMENT: &str = "cq: jobs may not reach the worker host";

/// Whether jobs on the isolated bridge can reach the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostIsolation {
    /// The rule is in place (added now or found from an earlier start).
    Enforced,
    /// It could not be put in place; jobs can reach services listening on the host.
    Missing(String),
}

/// Makes sure packets entering from `bridge` toward the host itself are rejected (both IPv4 and
/// IPv6 where ip6tables exists; answers to connections the host opened still pass).
pub fn isolate_host(bridge: &str) -> HostIsolation {
    // Check-then-insert is not atomic: workers starting together in one process would both add
    // the rule. (Across processes a duplicate is harmless, only untidy.)
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut missing = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        if let Err(e) = ensure_rule(tool, bridge) {
            // IPv6 is optional: Docker bridges have no IPv6 unless configured.
            if tool == "iptables" {
                missing.push(e);
            } else {
                tracing::debug!(error = %e, "no IPv6 host isolation rule");
            }
        }
    }
    if missing.is_empty() { HostIsolation::Enforced } else { HostIsolation::Missing(missing.join("; ")) }
}

fn rule(bridge: &str) -> Vec<String> {
    [
        "INPUT",
        "-i",
        bridge,
        "-m",
        "conntrack",
        "!",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "REJECT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ensure_rule(tool: &str, bridge: &str) -> Result<(), String> {
    let run = |action: &str| {
        Command::new(tool)
            .arg("-w")
            .arg(action)
            .args(rule(bridge))
            .output()
            .map_err(|e| format!("cannot run {tool}: {e}"))
    };
    let present = run("-C")?;
    if present.status.success() {
        return Ok(());
    }
    let added = run("-I")?;
    if added.status.success() {
        Ok(())
    } else {
        Err(format!("{tool} refused the rule: {}", String::from_utf8_lossy(&added.stderr).trim()))
    }
}
