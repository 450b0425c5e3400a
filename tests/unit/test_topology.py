"""Topology: which ranks share a node (overrides, backends, agreement) and the sub-groups."""
from __future__ import annotations

import pytest
import torch

from qoda_hvd.comm import LocalGroup
from qoda_hvd.comm.topology import (SubsetCommunicator, Topology, detect_topology,
                                    node_communicators, nodes_from_ranks_per_node,
                                    parse_node_list, resolve_topology, validate_node_of)
from fake_ranks import run_group, run_ranks


def test_topology_properties():
    t = Topology((0, 0, 0, 1, 1, 1), rank=4, source="override")
    assert (t.num_nodes, t.ranks_per_node, t.node, t.local_rank, t.local_ranks) == (2, 3, 1, 1,
                                                                                  [3, 4, 5])
    assert t.cross_ranks == [1, 4] and t.two_level
    assert t.local_groups() == [[0, 1, 2], [3, 4, 5]]
    assert t.cross_groups() == [[0, 3], [1, 4], [2, 5]]
    assert t.describe() == "2 nodes x 3 ranks (override)"
    het = Topology((0, 0, 0, 1), rank=0, source="local")
    assert not het.homogeneous and not het.two_level and het.ranks_per_node is None
    assert "heterogeneous" in het.describe()
    with pytest.raises(ValueError, match=r"nodes of different sizes"):
        het.cross_groups()
    assert not Topology((0, 1, 2), 0, "local").two_level  # one rank per node
    assert not Topology((0, 0, 0), 0, "local").two_level  # one node


@pytest.mark.parametrize("call, match", [
    (lambda: nodes_from_ranks_per_node(4, 3, "QODA_RANKS_PER_NODE"),
     r"QODA_RANKS_PER_NODE must be an integer >= 1 that divides the 4 ranks, got 3"),
    (lambda: nodes_from_ranks_per_node(4, "two", "QODA_RANKS_PER_NODE"),
     r"QODA_RANKS_PER_NODE must be an integer .* got 'two'"),
    (lambda: nodes_from_ranks_per_node(4, 0), r"ranks_per_node must be .* got 0"),
    (lambda: parse_node_list("0,0,1", 4), r"QODA_NODE_OF_RANK must be 4 comma-separated node "
                                          r"numbers >= 0 \(one per rank\), got '0,0,1'"),
    (lambda: parse_node_list("0,a,1,1", 4), r"QODA_NODE_OF_RANK must be 4 .* got '0,a,1,1'"),
    (lambda: parse_node_list("0,-1,1,1", 4), r"got '0,-1,1,1'"),
    (lambda: validate_node_of([0, 1], 3), r"node_of must give a node number >= 0 for each of "
                                          r"the 3 ranks, got \[0, 1\]"),
    (lambda: LocalGroup(4, ranks_per_node=3), r"ranks_per_node must be .* divides the 4 ranks"),
])
def test_bad_overrides_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_override_parsing():
    assert nodes_from_ranks_per_node(4, "2") == (0, 0, 1, 1)
    assert parse_node_list("3,3,1,1", 4) == (0, 0, 1, 1)   # renumbered by lowest rank
    assert validate_node_of([1, 0, 1, 0], 4) == (0, 1, 0, 1)


def test_single_rank_needs_no_collective():
    comm = LocalGroup(1)[0]
    t = detect_topology(comm, environ={})
    assert t.node_of == (0,) and comm.stats.setup_collectives == 0


@pytest.mark.parametrize("kwargs, env, expected", [
    ({}, {}, (0, 1, 2, 3)),                                            # one rank per node
    ({}, {"QODA_RANKS_PER_NODE": "2"}, (0, 0, 1, 1)),
    ({}, {"QODA_NODE_OF_RANK": "0,1,0,1"}, (0, 1, 0, 1)),
    ({"ranks_per_node": 4}, {"QODA_RANKS_PER_NODE": "2"}, (0, 0, 0, 0)),  # argument beats env
    ({}, {"QODA_RANKS_PER_NODE": "2", "QODA_NODE_OF_RANK": "0,0,1,1"}, (0, 0, 1, 1)),
])
def test_detect_agreed_on_every_rank(kwargs, env, expected):
    out = run_ranks(4, lambda r, c: (detect_topology(c, environ=env, **kwargs), c.stats))
    for r, (t, st) in enumerate(out):
        assert t.node_of == expected and t.rank == r
        assert st.setup_collectives == 1 and st.collectives == 0  # set-up, not a step's


def test_local_group_placement_is_found():
    group = LocalGroup(4, node_of=[0, 0, 0, 1])
    out = run_group(group, lambda r, c: detect_topology(c, environ={}))
    assert all(t.node_of == (0, 0, 0, 1) and t.source == "local" for t in out)
    assert not out[0].homogeneous


def test_overrides_that_differ_between_ranks_fail_the_same_on_every_rank():
    envs = [{"QODA_RANKS_PER_NODE": "2"}, {"QODA_RANKS_PER_NODE": "2"}, {}, {}]
    out = run_group(LocalGroup(4), lambda r, c: detect_topology(c, environ=envs[r]))
    assert all(isinstance(e, ValueError) for e in out), out
    assert len({str(e) for e in out}) == 1
    assert "QODA_RANKS_PER_NODE differs between ranks (rank 0 has '2', rank 2 has None" in str(out[0])


def test_malformed_override_fails_on_every_rank():
    out = run_group(LocalGroup(4), lambda r, c: detect_topology(
        c, environ={"QODA_RANKS_PER_NODE": "3"}))
    assert all(isinstance(e, ValueError) for e in out)
    assert "QODA_RANKS_PER_NODE must be an integer >= 1 that divides the 4 ranks, got '3'" in str(out[1])
    out = run_group(LocalGroup(4), lambda r, c: detect_topology(
        c, environ={"QODA_RANKS_PER_NODE": "2", "QODA_NODE_OF_RANK": "0,1,0,1"}))
    assert all(isinstance(e, ValueError) and "disagree" in str(e) for e in out)


def _hvd(rank, local_rank, local_size, host, whole=True):
    return {"backend": "horovod", "hvd_rank": rank, "local_rank": local_rank,
            "local_size": local_size, "host": host, "whole_job": whole}


def test_horovod_views():
    # horovodrun: ranks contiguous per host
    views = [_hvd(0, 0, 2, "a"), _hvd(1, 1, 2, "a"), _hvd(2, 0, 2, "b"), _hvd(3, 1, 2, "b")]
    t = resolve_topology(views, 2)
    assert t.node_of == (0, 0, 1, 1) and t.source == "horovod"
    # round-robin placement (mpirun --map-by node): only the host names explain it
    views = [_hvd(0, 0, 2, "a"), _hvd(1, 0, 2, "b"), _hvd(2, 1, 2, "a"), _hvd(3, 1, 2, "b")]
    assert resolve_topology(views, 0).node_of == (0, 1, 0, 1)
    # heterogeneous: 3 + 1
    views = [_hvd(0, 0, 3, "a"), _hvd(1, 1, 3, "a"), _hvd(2, 2, 3, "a"), _hvd(3, 0, 1, "b")]
    t = resolve_topology(views, 0)
    assert t.node_of == (0, 0, 0, 1) and not t.homogeneous
    # numbers that nothing explains (emulated nodes share a host name, placement round robin)
    views = [_hvd(0, 0, 2, "x"), _hvd(1, 0, 2, "x"), _hvd(2, 1, 2, "x"), _hvd(3, 1, 2, "x")]
    t = resolve_topology(views, 0)
    assert t.source == "unknown" and t.node_of == (0, 1, 2, 3) and "fit neither" in t.note


@pytest.mark.parametrize("layout", [(2, 2), (3, 2), (2, 3)])
def test_node_communicators_on_fake_ranks(layout):
    L, M = layout
    K = L * M

    def fn(r, c):
        t = detect_topology(c, environ={})
        local, cross = node_communicators(c, t)
        x = torch.arange(3 * L, dtype=torch.float32) + 100 * r
        shard = local.reduce_scatter_sum(list(x.split(3)))
        mine = cross.allgather(torch.tensor([r], dtype=torch.uint8))
        total = cross.allreduce_sum(shard)
        return t, local, cross, shard, [int(p) for p in mine], total

    out = run_group(LocalGroup(K, ranks_per_node=L), fn)
    for r, (t, local, cross, shard, mine, total) in enumerate(out):
        node, i = divmod(r, L)
        assert (local.size, local.rank, cross.size, cross.rank) == (L, i, M, node)
        node_ranks = range(node * L, node * L + L)
        expect = sum(torch.arange(3 * L, dtype=torch.float32)[3 * i:3 * i + 3] + 100 * q
                     for q in node_ranks)
        assert torch.equal(shard, expect)
        assert mine == [n * L + i for n in range(M)]
        assert torch.equal(total, sum(out[n * L + i][3] for n in range(M)))
        # each group counts its own; the parent's totals are the sum of both
        assert local.stats.reducescatters == 1 and cross.stats.allgathers == 1
        parent = local.parent_stats[0]
        assert (parent.collectives, parent.reducescatters, parent.setup_collectives) == (3, 1, 1)
        assert parent.bytes_sent > local.stats.bytes_sent + cross.stats.bytes_sent


def test_traffic_stays_inside_the_groups():
    group = LocalGroup(4, ranks_per_node=2, record_traffic=True)
    comms = run_group(group, lambda r, c: node_communicators(c, detect_topology(c, environ={})))
    group.traffic[:] = 0

    def fn(r, c):
        c.allreduce_sum(torch.zeros(1))
        comms[r][0].allgather(torch.zeros(10, dtype=torch.uint8))

    run_group(group, fn)
    t = group.traffic
    # a ring allreduce of one float32 (2*3/4*4 = 6 bytes to the next rank); the node
    # allgather: 10 bytes to the other rank of the node, nothing across
    assert t[0, 1] == 6 + 10 and t[1, 0] == 10 and t[2, 3] == 6 + 10 and t[0, 2] == 0
    assert t[1, 2] == 6 and t[3, 0] == 6 and t[3, 1] == 0


def test_subset_communicator_over_any_parent():
    """The generic groups (Horovod without process sets): one parent alltoall per call."""
    def fn(r, c):
        members = [0, 2] if r in (0, 2) else [3, 1]
        sub = SubsetCommunicator(c, members)
        got = sub.allgather(torch.tensor([r] * (r + 1), dtype=torch.uint8))
        red = sub.allreduce_sum(torch.tensor([float(r), 1.0]))
        rs = sub.reduce_scatter_sum([torch.tensor([1.0 + r]), torch.tensor([2.0 + r])])
        return sub.rank, [p.tolist() for p in got], red.tolist(), rs.tolist(), c.stats.collectives

    out = run_ranks(4, fn)
    assert out[0] == (0, [[0], [2, 2, 2]], [2.0, 2.0], [1.0 + 1 + 2], 3)
    assert out[3][:3] == (0, [[3, 3, 3, 3], [1, 1]], [4.0, 2.0])
    assert out[1][0] == 1 and out[1][3] == [2.0 + 3 + 2.0 + 1]
    with pytest.raises(ValueError, match=r"members must be distinct ranks of the parent"):
        SubsetCommunicator(LocalGroup(1)[0], [1])


def test_subgroup_must_partition():
    with pytest.raises(ValueError, match=r"groups must partition the ranks 0..1"):
        LocalGroup(2)[0].subgroup([[0]])
