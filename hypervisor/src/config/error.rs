//! [`ConfigError`], the error every refused VM is reported with, and its constructor.

use alloc::string::{String, ToString};

/// One VM config error: names the VM and the offending field, e.g.
/// "vm2: `cpus`: 5 vCPUs but the machine has 4 CPUs".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{vm}: `{field}`: {reason}")]
pub struct ConfigError {
    /// Name of the VM (`smmu-hv,name` if readable, else the node name).
    pub vm: String,
    /// The DT property at fault (`module` for module children, `name` for duplicate names).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Builds a [`ConfigError`].
pub(super) fn cfg_err(vm: &str, field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        vm: vm.to_string(),
        field,
        reason: reason.into(),
    }
}
