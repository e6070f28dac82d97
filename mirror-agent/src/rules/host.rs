//! The plan on this host: the configuration checked against the interfaces present now.
use super::{Interface, Plan, plan};
use crate::config::{ConfigError, LoadedConfig, PodSelector};

#[derive(Debug, thiserror::Error)]
pub enum HostPlanError {
    #[error("listing the interfaces: {0}")]
    Interfaces(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The plan of `loaded` on this host's interfaces (its warnings for the caller to show).
pub fn plan_on_host(loaded: &LoadedConfig) -> Result<Plan, HostPlanError> {
    plan_selecting(loaded, &|_| Vec::new())
}

/// [`plan_on_host`], where pod-selector sessions watch the interfaces `pods` gives for their
/// selector.
pub fn plan_selecting(
    loaded: &LoadedConfig,
    pods: &dyn Fn(&PodSelector) -> Vec<Interface>,
) -> Result<Plan, HostPlanError> {
    let interfaces = crate::targets::interface::present()?;
    let plan = plan(loaded, &interfaces, pods)?;
    // The collectors this host cannot send to, at the target that names them.
    let refused = plan
        .sessions
        .iter()
        .zip(&loaded.config.sessions)
        .filter_map(|(session, config)| {
            let why = crate::targets::tunnel::refused_on_host(session.target.tunnel()?)?;
            Some(loaded.error(
                config.get_ref().target.span(),
                format!("session `{}`: {why}", session.name),
            ))
        })
        .collect();
    crate::config::ConfigError::gather(refused)?;
    Ok(plan)
}
