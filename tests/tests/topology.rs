//! The harness's own topology: addresses, routes, cgroup layout and teardown behave as
//! the other suites assume.

use std::process::Command;

use tollgate_tests::topology::{
    cgroup2_mount, CgroupDriver, PodSpec, QosClass, Topology, API_SERVER_IP, CLUSTER_IP,
};

fn ping(cmd: &mut Command) -> bool {
    cmd.args(["-c", "1", "-W", "1", "-q"])
        .output()
        .expect("running ping")
        .status
        .success()
}

#[test]
fn pods_reach_the_cluster_network_and_nothing_else() {
    let id = tollgate_tests::topology::unique_id();
    let topo = Topology::create(&id, 1).expect("building the topology");
    let node = topo.node(1);
    let pod = node
        .add_pod(
            1,
            PodSpec::new("reach", CgroupDriver::Systemd, QosClass::Burstable),
        )
        .expect("adding a pod");

    let mut to_api = pod.command("ping").unwrap();
    to_api.arg(API_SERVER_IP.to_string());
    assert!(ping(&mut to_api), "pod cannot reach the API server address");

    let mut to_node = pod.command("ping").unwrap();
    to_node.arg(node.ip.to_string());
    assert!(ping(&mut to_node), "pod cannot reach its node");

    // Without a DNAT rule the ClusterIP answers nobody, and addresses outside the
    // topology have no route at all.
    let mut to_cluster_ip = pod.command("ping").unwrap();
    to_cluster_ip.arg(CLUSTER_IP.to_string());
    assert!(
        !ping(&mut to_cluster_ip),
        "ClusterIP answered without kube-proxy's DNAT"
    );
    let mut outside = node.netns.command("ping");
    outside.arg("192.0.2.1");
    assert!(
        !ping(&mut outside),
        "the node reached an address outside the topology"
    );

    let pod_cgroup = pod.pod_cgroup.clone();
    assert!(pod_cgroup.starts_with(&topo.cgroup_root));
    drop(topo);
    assert!(!pod_cgroup.exists(), "teardown left the pod cgroup");
    assert!(
        !cgroup2_mount().unwrap().join(&id).exists(),
        "teardown left the cgroup root"
    );
    assert!(
        !std::path::Path::new(&format!("/run/netns/{id}-cp")).exists(),
        "teardown left the control-plane namespace"
    );
}

#[test]
fn kubelet_cgroup_layout_for_every_driver_and_qos_class() {
    let id = tollgate_tests::topology::unique_id();
    let topo = Topology::create(&id, 1).expect("building the topology");
    let node = topo.node(1);
    let mut n = 0;
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in QosClass::ALL {
            n += 1;
            let spec = PodSpec::new(&format!("layout{n}"), driver, qos);
            let uid = spec.uid.clone();
            let pod = node.add_pod(n, spec).unwrap();
            let rel = pod.pod_cgroup.strip_prefix(&topo.cgroup_root).unwrap();
            let rel = rel.to_str().unwrap();
            let expected = match (driver, qos) {
                (CgroupDriver::Systemd, QosClass::Guaranteed) => {
                    format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))
                }
                (CgroupDriver::Systemd, QosClass::Burstable) => format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                    uid.replace('-', "_")
                ),
                (CgroupDriver::Systemd, QosClass::BestEffort) => format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ),
                (CgroupDriver::Cgroupfs, QosClass::Guaranteed) => format!("kubepods/pod{uid}"),
                (CgroupDriver::Cgroupfs, QosClass::Burstable) => {
                    format!("kubepods/burstable/pod{uid}")
                }
                (CgroupDriver::Cgroupfs, QosClass::BestEffort) => {
                    format!("kubepods/besteffort/pod{uid}")
                }
            };
            assert_eq!(rel, expected);
            // A process started in the pod runs in the container cgroup below it.
            let out = pod
                .command("cat")
                .unwrap()
                .arg("/proc/self/cgroup")
                .output()
                .unwrap();
            let cgroups = String::from_utf8_lossy(&out.stdout);
            let v2 = cgroups.lines().find(|l| l.starts_with("0::")).unwrap();
            assert!(
                v2.ends_with(&format!(
                    "/{}",
                    pod.container_cgroup.file_name().unwrap().to_str().unwrap()
                )),
                "process is in {v2}"
            );
        }
    }
}
