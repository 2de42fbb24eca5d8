//! Running the appliance: the YAML configuration ([`config`]), admin HTTP with `/metrics`,
//! `/healthz` and `/state` ([`admin`]), dropping privileges once setup is done ([`privs`]), and
//! the operator's terminal view over `/metrics` ([`top`]).

pub mod admin;
pub mod config;
pub mod privs;
pub mod top;
