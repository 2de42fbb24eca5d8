//! Running the appliance: the YAML configuration ([`config`]), admin HTTP with `/metrics`,
//! `/healthz` and `/state` ([`admin`]), and dropping privileges once setup is done ([`privs`]).

pub mod admin;
pub mod config;
pub mod privs;
