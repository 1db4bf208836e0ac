"""The tests the nested-KVM layer runs inside the outer VM (``test_kvm_nested.py``).

ember's own tests, chosen to cover the KVM path once each: boot, exec, files, pause and
resume, snapshot and restore (and a restore refused for another CPU), template snapshots
(the default create), fork, 2 vCPUs, the jail and its cgroup, ``ember doctor``, ``ember
image check``, the bench's microVM column and a networked guest (policy, proxy, networked
restore and fork). Every id must pass inside; one that is skipped or missing fails the
layer.
"""

from __future__ import annotations

KVM_PATH = "tests/integration/test_kvm_path.py"

SELECTION: tuple[str, ...] = (
    # First: test_cli expects a home with no sandbox left by a fixture of another module.
    "tests/integration/test_cli.py::test_doctor_reports_accelerator_and_reason",
    "tests/integration/test_image_build.py::test_default_template_boots_and_reports_its_digest",
    f"{KVM_PATH}::test_a_jailed_guest_runs_under_kvm_with_the_stock_device_mode",
    f"{KVM_PATH}::test_doctor_judges_kvm_as_the_jail_runs_it",
    f"{KVM_PATH}::test_a_device_the_jail_cannot_open_falls_back_to_tcg_with_the_fix",
    f"{KVM_PATH}::test_a_kvm_snapshot_records_its_cpu_and_another_cpu_is_refused",
    f"{KVM_PATH}::test_gvisor_platform_is_chosen_by_a_probe",
    f"{KVM_PATH}::test_bench_measures_the_microvm_column_under_kvm",
    "tests/integration/test_sdk_exec.py::test_exec_python_and_exit_codes[booted]",
    "tests/integration/test_sdk_exec.py::test_streaming_callbacks_and_iterator[booted]",
    "tests/integration/test_sdk_exec.py::test_background_process_stdin_signal_and_ps[booted]",
    "tests/integration/test_sdk_files.py::test_write_read_list_stat_rename_remove[booted]",
    "tests/integration/test_sdk_files.py::test_large_file_roundtrip[booted]",
    "tests/integration/test_template_snapshots.py::"
    "test_first_create_makes_it_and_the_next_ones_restore_it",
    "tests/integration/test_snapshots.py::test_restore_keeps_files_and_running_processes",
    "tests/integration/test_snapshots.py::test_fork_clones_differ_and_share_nothing_writable",
    "tests/integration/test_snapshots.py::test_pause_and_resume",
    "tests/integration/test_snapshots.py::test_corrupt_and_mismatched_snapshots_are_refused",
    "tests/integration/test_jail.py::test_qemu_runs_as_an_unprivileged_uid_of_the_range",
    "tests/integration/test_jail.py::test_qemu_has_its_own_namespaces",
    "tests/integration/test_jail.py::test_qemu_root_holds_only_its_own_files",
    "tests/integration/test_jail.py::test_rlimits_and_cgroup_limits_match_the_sandbox",
    "tests/integration/test_jail.py::test_guest_still_works_under_the_jail",
    # Networking: a NIC (tap handed to the jailed QEMU) under KVM, its policy, web traffic
    # through the proxy, and a networked snapshot's restore and fork.
    "tests/integration/test_network.py::test_internet_reached_private_and_host_refused",
    "tests/integration/test_network.py::"
    "test_web_traffic_is_checked_by_name_where_an_address_cannot_bypass_it",
    "tests/integration/test_network.py::"
    "test_fork_and_restore_of_a_networked_sandbox_keep_its_policy",
)


def junit_key(node_id: str) -> tuple[str, str]:
    """(classname, name) of a node id in pytest's JUnit XML."""
    path, _, name = node_id.partition("::")
    return path.removesuffix(".py").replace("/", "."), name
