//! Running the appliance: the YAML configuration ([`config`]), admin HTTP with `/metrics`,
//! `/healthz` and `/state` ([`admin`]), the one table of every exported series ([`metrics`]), dropping privileges once setup is done ([`privs`]), and
//! the operator's terminal view over `/metrics` ([`top`]).

pub mod admin;
pub mod config;
pub mod metrics;
pub mod privs;
pub mod top;
