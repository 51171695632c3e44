"""--engine ray planning, without Ray: which device kind a cluster gets, what one actor reserves,
how many actors fit. (The Ray runs themselves are in test_ray_engine.py.)"""

from __future__ import annotations

import sys

import pytest

from caption_helpers import SAMPLES, caption

from jobs.caption_ray import ActorPlan, plan_actors
from pipeline.config import BatchConfig, RunConfig
from pipeline.device import DeviceError, cluster_device_kind, device_kind, ray_actor_options
from pipeline.distribute import capacity, demand, total
from pipeline.errors import JobError

GPU_NODE = {"CPU": 32.0, "GPU": 8.0, "memory": 5e11, "node:10.0.0.1": 1.0}
NPU_NODE = {"CPU": 192.0, "NPU": 8.0, "node:10.0.0.2": 1.0}
CPU_NODE = {"CPU": 16.0, "node:10.0.0.3": 1.0}


def _cfg(**kw) -> RunConfig:
    return RunConfig(manifest="m.txt", model="ckpt", out="run", engine="ray", **kw)


def test_device_kind_and_cluster_choice():
    assert device_kind("auto") is None and device_kind("cuda:3") == "cuda" and device_kind("NPU") == "npu"
    with pytest.raises(DeviceError, match="bad device 'cpu:1'"):
        device_kind("cpu:1")
    assert cluster_device_kind("auto", total([GPU_NODE, NPU_NODE])) == "npu"      # like auto_spec(): NPU first
    assert cluster_device_kind("auto", total([GPU_NODE, CPU_NODE])) == "cuda"
    assert cluster_device_kind("auto", total([CPU_NODE])) == "cpu"
    assert cluster_device_kind("cpu", total([GPU_NODE])) == "cpu"
    with pytest.raises(DeviceError, match="no GPU resource .*it has: CPU, NPU"):
        cluster_device_kind("cuda", total([CPU_NODE, NPU_NODE]))


def test_actor_options_name_one_whole_accelerator():
    assert ray_actor_options("cuda", 3) == {"num_cpus": 3, "num_gpus": 1}
    assert ray_actor_options("npu", 2) == {"num_cpus": 2, "resources": {"NPU": 1}}
    assert ray_actor_options("cpu", 8) == {"num_cpus": 8}
    assert demand(ray_actor_options("npu", 2)) == {"CPU": 2.0, "NPU": 1.0}
    assert demand(ray_actor_options("cuda", 3)) == {"CPU": 3.0, "GPU": 1.0}


def test_capacity_counts_per_node():
    # 8 GPUs per node but only 32 CPUs: 5 CPUs per actor fit 6 per node, not 8
    assert capacity([GPU_NODE, GPU_NODE], {"CPU": 5.0, "GPU": 1.0}) == 12
    assert capacity([GPU_NODE, GPU_NODE], {"CPU": 3.0, "GPU": 1.0}) == 16
    assert capacity([GPU_NODE, CPU_NODE], {"CPU": 1.0, "GPU": 1.0}) == 8          # the CPU node holds none
    assert capacity([CPU_NODE, {"CPU": 6.0}], {"CPU": 4.0}) == 5                 # 4 + 1: actors never span nodes
    assert capacity([{"CPU": 2.0}], {"CPU": 3.0}) == 0


def test_plan_actors_cpu_one_per_node_unless_threads():
    plan = plan_actors(_cfg(), "cpu", [CPU_NODE, {"CPU": 12.0}])
    assert (plan.cpus, plan.workers, plan.options) == (12, 6, {"num_cpus": 12})   # fits the smaller node
    assert capacity([CPU_NODE, {"CPU": 12.0}], demand(plan.options)) == 2
    plan = plan_actors(_cfg(threads=4, batch=BatchConfig(workers=1)), "cpu", [CPU_NODE])
    assert (plan.cpus, plan.workers) == (4, 1) and capacity([CPU_NODE], demand(plan.options)) == 4


def test_plan_actors_accelerators_are_never_left_idle_by_cpu_reservations():
    plan = plan_actors(_cfg(), "cuda", [GPU_NODE])
    assert plan == ActorPlan("cuda", 3, 2, {"num_cpus": 3, "num_gpus": 1})
    assert capacity([GPU_NODE], demand(plan.options)) == 8
    plan = plan_actors(_cfg(batch=BatchConfig(workers=8)), "cuda", [GPU_NODE])          # wants 9 CPUs, the node has 4 per GPU
    assert (plan.cpus, plan.workers) == (4, 8) and capacity([GPU_NODE], demand(plan.options)) == 8
    plan = plan_actors(_cfg(), "npu", [NPU_NODE, CPU_NODE])
    assert plan.options == {"num_cpus": 3, "resources": {"NPU": 1}}
    assert capacity([NPU_NODE, CPU_NODE], demand(plan.options)) == 8


def test_engine_ray_without_ray_installed_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)                 # import ray -> ImportError
    with pytest.raises(JobError, match=r"^--engine ray needs Ray: pip install 'vlm-caption-pipeline\[ray\]'"):
        caption(manifest=SAMPLES, out=tmp_path / "run", engine="ray")
    assert not (tmp_path / "run").exists()                        # refused before the run dir is made
