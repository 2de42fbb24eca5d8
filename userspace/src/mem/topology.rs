//! The host's topology (NUMA nodes, their cores and memory, the NIC's node) and where the
//! appliance's threads go.
//!
//! Discovery asks hwloc (through hwlocality) first: it knows the nodes' memory and finds the NIC
//! as an I/O object under its PCI bridge, so the NIC's node comes from the hardware tree. Where
//! hwloc cannot build a topology, sysfs answers instead, and the report says which did. A NIC in
//! another network namespace than the one /sys was mounted in, or a virtual device (veth), has
//! no node: the plan then uses every online core and says so.
//!
//! The plan ([`plan`]): ingest thread `q` on core `q mod n` of the NIC's node (its UMEM is bound
//! there too); the dispatcher and the workers on that node's remaining cores, one core each while
//! they last, unless the configuration names cores; whatever does not get a core of its own is
//! left to the scheduler rather than stacked on a busy core.

use std::fmt;

use serde::Serialize;

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The OS's node number.
    pub id: u32,
    /// Its online cores (OS numbering).
    pub cpus: Vec<u32>,
    /// Its local memory, bytes (0 when unknown).
    pub memory_bytes: u64,
}

/// The host as discovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// `hwloc` or `sysfs`.
    pub source: &'static str,
    /// Nodes, by id.
    pub nodes: Vec<Node>,
    /// The interface asked about, if any.
    pub iface: Option<String>,
    /// Its node, if the hardware says.
    pub nic_node: Option<u32>,
}

impl Topology {
    /// Discovers the topology, and the node of `iface` if given.
    pub fn discover(iface: Option<&str>) -> Self {
        let mut t = hwloc(iface).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "hwloc topology unavailable; reading sysfs");
            sysfs()
        });
        t.iface = iface.map(str::to_owned);
        if t.nic_node.is_none()
            && let Some(i) = iface
        {
            t.nic_node = crate::mem::numa::iface_node(i).ok().flatten();
        }
        t
    }

    /// The cores of node `id`.
    pub fn node_cpus(&self, id: u32) -> Option<&[u32]> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.cpus.as_slice())
    }

    /// Every core, in order.
    pub fn all_cpus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} NUMA node{} (from {}){}",
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.source,
            if self.nodes.len() == 1 {
                ": placement is about cores only"
            } else {
                ""
            }
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "  node {}: cpus {}, {} MiB",
                n.id,
                cpu_list(&n.cpus),
                n.memory_bytes >> 20
            )?;
        }
        match (&self.iface, self.nic_node) {
            (Some(i), Some(n)) => writeln!(f, "  {i}: on node {n}"),
            (Some(i), None) => writeln!(
                f,
                "  {i}: no NUMA node reported (virtual device, one-node machine, or another \
                 namespace's device); using every online core"
            ),
            (None, _) => Ok(()),
        }
    }
}

/// `0-3,8` style.
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(not(feature = "hwloc"))]
fn hwloc(_iface: Option<&str>) -> Result<Topology, String> {
    Err("built without the hwloc feature".into())
}

#[cfg(feature = "hwloc")]
fn hwloc(iface: Option<&str>) -> Result<Topology, String> {
    use hwlocality::topology::builder::TypeFilter;

    let topo = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    from_hwloc(&topo, iface)
}

impl Topology {
    /// The topology hwloc builds from a synthetic description (`"node:2 core:2 pu:1"`, hwloc's
    /// syntax), through the same reading as [`Topology::discover`]: for tests of the placement
    /// on machines this one is not.
    ///
    /// # Errors
    /// hwloc's, for a description it refuses.
    #[cfg(feature = "hwloc")]
    pub fn synthetic(description: &str) -> Result<Self, String> {
        let topo = hwlocality::Topology::builder()
            .from_synthetic(description)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())?;
        from_hwloc(&topo, None)
    }
}

/// Reads nodes, their cores and memory, and the NIC's node from an hwloc topology.
#[cfg(feature = "hwloc")]
fn from_hwloc(topo: &hwlocality::Topology, iface: Option<&str>) -> Result<Topology, String> {
    use hwlocality::object::types::ObjectType;

    let mut nodes: Vec<Node> = topo
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|n| {
            let id = u32::try_from(n.os_index()?).ok()?;
            let cpus = n
                .cpuset()
                .map(|s| {
                    s.iter_set()
                        .filter_map(|c| u32::try_from(usize::from(c)).ok())
                        .collect()
                })
                .unwrap_or_default();
            Some(Node {
                id,
                cpus,
                memory_bytes: n.total_memory(),
            })
        })
        .collect();
    if nodes.is_empty() {
        return Err("hwloc reported no NUMA node".into());
    }
    nodes.sort_by_key(|n| n.id);
    let nic_node = iface.and_then(|i| {
        let dev = topo
            .objects_with_type(ObjectType::OSDevice)
            .find(|o| o.name().is_some_and(|n| n.to_bytes() == i.as_bytes()))?;
        let anchor = dev.first_non_io_ancestor()?;
        let set = anchor.nodeset()?;
        // A device whose ancestor spans several nodes is not local to one.
        (set.weight() == Some(1))
            .then(|| set.first_set())
            .flatten()
            .and_then(|n| u32::try_from(usize::from(n)).ok())
    });
    Ok(Topology {
        source: "hwloc",
        nodes,
        iface: None,
        nic_node,
    })
}

fn sysfs() -> Topology {
    let mut nodes: Vec<Node> = crate::mem::numa::online_nodes()
        .into_iter()
        .map(|id| Node {
            id,
            cpus: crate::mem::numa::node_cpus(id),
            memory_bytes: 0,
        })
        .collect();
    if nodes.iter().all(|n| n.cpus.is_empty()) {
        // Kernels without NUMA: one node holding every online core.
        nodes = vec![Node {
            id: 0,
            cpus: crate::mem::numa::online_cpus(),
            memory_bytes: 0,
        }];
    }
    Topology {
        source: "sysfs",
        nodes,
        iface: None,
        nic_node: None,
    }
}

/// Where each thread runs (`None`: left to the scheduler).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The node the NIC-side threads and memory are on, if one.
    pub node: Option<u32>,
    /// Core of the ingest thread of each RX queue.
    pub ingest: Vec<u32>,
    /// The dispatcher's core.
    pub dispatcher: Option<u32>,
    /// Each worker's core (realtime workers first, then transactional, then batch).
    pub workers: Vec<Option<u32>>,
    /// Where the housekeeping thread (admin, accepts, the tick) may run: every core that no
    /// ingest thread has, so its wake-ups never preempt a receive queue's thread; empty (left
    /// to the scheduler) when ingest has every core or nothing is pinned.
    pub housekeeping: Vec<u32>,
    /// How each choice was made, for the log.
    pub why: Vec<String>,
}

/// What the plan needs from the configuration.
#[derive(Debug, Clone, Default)]
pub struct PlanInput<'a> {
    /// RX queues (ingest threads); 0 for the kernel UDP path, which pins nothing.
    pub queues: u32,
    /// `engine.dispatcher_cpu`.
    pub dispatcher_cpu: Option<u32>,
    /// `engine.worker_cpus`.
    pub worker_cpus: &'a [u32],
    /// Workers in all.
    pub workers: usize,
    /// `engine.auto_placement`: place unconfigured threads on the NIC node's spare cores.
    pub auto: bool,
}

/// Places the threads (see the module documentation).
pub fn plan(topo: &Topology, input: &PlanInput<'_>) -> Plan {
    let mut why = Vec::new();
    let node = topo.nic_node.filter(|n| topo.node_cpus(*n).is_some());
    let local: Vec<u32> = match node {
        Some(n) => topo.node_cpus(n).unwrap_or_default().to_vec(),
        None => topo.all_cpus(),
    };
    let ingest: Vec<u32> = if local.is_empty() {
        Vec::new()
    } else {
        (0..input.queues as usize)
            .map(|q| local[q % local.len()])
            .collect()
    };
    if !ingest.is_empty() {
        why.push(format!(
            "ingest on {} of {}",
            cpu_list(&dedup_sorted(&ingest)),
            node.map_or("the machine".to_owned(), |n| format!("node {n}"))
        ));
    }
    let mut spare = local
        .iter()
        .copied()
        .filter(|c| !ingest.contains(c))
        .collect::<Vec<_>>()
        .into_iter();
    let auto = input.auto && input.queues > 0;
    let dispatcher = match input.dispatcher_cpu {
        Some(c) => {
            why.push(format!("dispatcher on cpu {c} (engine.dispatcher_cpu)"));
            Some(c)
        }
        None if auto => {
            let c = spare.next();
            why.push(c.map_or_else(
                || "dispatcher: no spare core on the node, left to the scheduler".to_owned(),
                |c| format!("dispatcher on spare cpu {c}"),
            ));
            c
        }
        None => None,
    };
    let workers = if !input.worker_cpus.is_empty() {
        why.push(format!(
            "workers on cpus {} (engine.worker_cpus)",
            cpu_list(&dedup_sorted(input.worker_cpus))
        ));
        (0..input.workers)
            .map(|k| Some(input.worker_cpus[k % input.worker_cpus.len()]))
            .collect()
    } else if auto {
        let w: Vec<Option<u32>> = (0..input.workers).map(|_| spare.next()).collect();
        let placed = w.iter().flatten().count();
        why.push(format!(
            "{placed} of {} workers on spare cores{}",
            input.workers,
            if placed < input.workers {
                ", the rest left to the scheduler"
            } else {
                ""
            }
        ));
        w
    } else {
        vec![None; input.workers]
    };
    let housekeeping: Vec<u32> = if ingest.is_empty() {
        Vec::new()
    } else {
        topo.all_cpus()
            .into_iter()
            .filter(|c| !ingest.contains(c))
            .collect()
    };
    if !housekeeping.is_empty() {
        why.push(format!(
            "housekeeping on {} (no ingest thread there)",
            cpu_list(&housekeeping)
        ));
    }
    Plan {
        node,
        ingest,
        dispatcher,
        workers,
        housekeeping,
        why,
    }
}

fn dedup_sorted(v: &[u32]) -> Vec<u32> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes(nic: Option<u32>) -> Topology {
        Topology {
            source: "test",
            nodes: vec![
                Node {
                    id: 0,
                    cpus: vec![0, 1, 2, 3],
                    memory_bytes: 1 << 30,
                },
                Node {
                    id: 1,
                    cpus: vec![4, 5, 6, 7],
                    memory_bytes: 1 << 30,
                },
            ],
            iface: Some("eth0".into()),
            nic_node: nic,
        }
    }

    #[test]
    fn ingest_and_spare_cores_stay_on_the_nic_node() {
        let p = plan(
            &two_nodes(Some(1)),
            &PlanInput {
                queues: 2,
                workers: 3,
                auto: true,
                ..PlanInput::default()
            },
        );
        assert_eq!(p.node, Some(1));
        assert_eq!(p.ingest, vec![4, 5]);
        assert_eq!(p.dispatcher, Some(6));
        assert_eq!(p.workers, vec![Some(7), None, None]);
        assert!(p.why.iter().any(|w| w.contains("1 of 3 workers")), "{p:?}");
        assert_eq!(
            p.housekeeping,
            vec![0, 1, 2, 3, 6, 7],
            "every core but the receive queues'"
        );
    }

    #[test]
    fn configured_cores_win_and_no_nic_node_uses_every_core() {
        let p = plan(
            &two_nodes(None),
            &PlanInput {
                queues: 1,
                dispatcher_cpu: Some(3),
                worker_cpus: &[6, 7],
                workers: 3,
                auto: true,
            },
        );
        assert_eq!(p.node, None);
        assert_eq!(p.ingest, vec![0]);
        assert_eq!(p.dispatcher, Some(3));
        assert_eq!(p.workers, vec![Some(6), Some(7), Some(6)]);
    }

    #[test]
    fn kernel_path_and_auto_off_pin_nothing_extra() {
        let t = two_nodes(Some(0));
        let kernel = plan(
            &t,
            &PlanInput {
                queues: 0,
                workers: 2,
                auto: true,
                ..PlanInput::default()
            },
        );
        assert!(kernel.ingest.is_empty() && kernel.dispatcher.is_none());
        assert_eq!(kernel.workers, vec![None, None]);
        assert!(
            kernel.housekeeping.is_empty(),
            "nothing pinned, nothing to avoid"
        );
        let off = plan(
            &t,
            &PlanInput {
                queues: 4,
                workers: 2,
                auto: false,
                ..PlanInput::default()
            },
        );
        assert_eq!(off.ingest, vec![0, 1, 2, 3]);
        assert_eq!(off.dispatcher, None);
    }

    #[cfg(feature = "hwloc")]
    #[test]
    fn a_synthetic_two_node_machine_through_hwloc_places_ingest_on_the_nic_node() {
        let mut topo = Topology::synthetic("node:2 core:4 pu:1").expect("hwloc synthetic");
        assert_eq!(topo.source, "hwloc");
        assert_eq!(topo.nodes.len(), 2, "{topo}");
        assert_eq!(topo.node_cpus(0), Some(&[0, 1, 2, 3][..]), "{topo}");
        assert_eq!(topo.node_cpus(1), Some(&[4, 5, 6, 7][..]), "{topo}");
        topo.nic_node = Some(1);
        let p = plan(
            &topo,
            &PlanInput {
                queues: 2,
                dispatcher_cpu: None,
                worker_cpus: &[],
                workers: 3,
                auto: true,
            },
        );
        assert_eq!(p.ingest, vec![4, 5], "one queue per core of the NIC's node");
        assert_eq!(p.dispatcher, Some(6), "{p:?}");
        assert_eq!(p.workers.first().copied().flatten(), Some(7), "{p:?}");
    }

    #[test]
    fn cpu_lists_are_compact() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn this_host_is_discovered() {
        let t = Topology::discover(Some("lo"));
        assert!(!t.nodes.is_empty());
        assert!(!t.all_cpus().is_empty());
        assert_eq!(t.nic_node, None, "loopback has no NUMA node");
    }
}
