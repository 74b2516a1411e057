"""Checks of a plan written out again, independently of ``placement.check``, so that a
mistake shared by the engine and its checker still fails a test (the property and
spread tests use them)."""

from __future__ import annotations

from kvpilot.operator.placement import Policy, Snapshot


def check_independently(snapshot: Snapshot, demands, policy: Policy, plan) -> None:
    nodes = {n.name: n for n in snapshot.nodes}
    old = {e.name: e for e in snapshot.replicas}
    by_model = {d.model: d for d in demands}
    usable = {n: int(node.gpu_hbm * (1 - policy.reserve)) for n, node in nodes.items()}
    load: dict[tuple[str, int], int] = {}
    streamed: dict[tuple[str, int], int] = {}
    budgets: dict[tuple[str, int], list[int]] = {}
    existing_load: dict[tuple[str, int], int] = {}
    for e in snapshot.replicas:
        for g in e.gpus:
            existing_load[(e.node, g)] = existing_load.get((e.node, g), 0) + e.hbm_per_gpu
    for a in plan.assignments:
        node = nodes[a.node]
        assert len(set(a.gpus)) == len(a.gpus) and all(0 <= g < node.gpus for g in a.gpus)
        e = old.get(a.replica)
        if not (e is not None and e.node == a.node and tuple(e.gpus) == a.gpus):
            assert node.ready and not node.cordoned, a
            d = by_model[a.model]
            assert not d.products or node.product in d.products, a
            req = d.requirements.get(node.product) or d.requirements.get("*")
            assert req is not None and (req.tp, req.hbm_per_gpu) == (len(a.gpus), a.hbm_per_gpu)
            assert a.step_bytes == req.step_bytes
        d = by_model.get(a.model)
        req = (d.requirements.get(node.product) or d.requirements.get("*")) if d else None
        for g in a.gpus:
            load[(a.node, g)] = load.get((a.node, g), 0) + a.hbm_per_gpu
            streamed[(a.node, g)] = streamed.get((a.node, g), 0) + a.step_bytes
            if req is not None and req.step_budget is not None:
                budgets.setdefault((a.node, g), []).append(req.step_budget)
    for (n, g), used in load.items():
        assert used <= max(usable[n], existing_load.get((n, g), 0)), (n, g, used)
    for key, step in streamed.items():
        if budgets.get(key) and key not in existing_load:
            assert step <= min(budgets[key]), (key, step, budgets[key])
    for d in demands:
        placed = sum(1 for a in plan.assignments if a.model == d.model)
        reasons = [u.reason for u in plan.unplaced if u.model == d.model]
        assert placed + len(reasons) == d.replicas and all(reasons)
    check_spread(snapshot, demands, policy, plan, usable, load, streamed, budgets)


def check_spread(snapshot, demands, policy, plan, usable, load, streamed, budgets) -> None:
    """Where a new replica of a spreading model shares its node ("node") or a GPU ("gpu")
    with another replica of it, no node (GPUs) holding none of them takes one more."""
    tenants: dict[tuple[str, int], int] = {}
    pods: dict[str, int] = {}
    for a in plan.assignments:
        pods[a.node] = pods.get(a.node, 0) + 1
        for g in a.gpus:
            tenants[(a.node, g)] = tenants.get((a.node, g), 0) + 1

    def sized(d, n):
        if not (n.ready and not n.cordoned) or (d.products and n.product not in d.products):
            return None
        req = d.requirements.get(n.product) or d.requirements.get("*")
        return req if req is not None and req.tp <= n.gpus else None

    def room(d, n, holding) -> bool:
        """Node n takes one more replica of d on GPUs that ``holding`` says hold none,
        at the fewest GPUs a replica of d takes anywhere."""
        req = sized(d, n)
        if req is None or (n.max_pods is not None and pods.get(n.name, 0) >= n.max_pods):
            return False
        if req.tp > min(r.tp for m in snapshot.nodes if (r := sized(d, m)) is not None):
            return False
        ok = 0
        for g in range(n.gpus):
            key = (n.name, g)
            if holding.get(key) or usable[n.name] - load.get(key, 0) < req.hbm_per_gpu:
                continue
            if tenants.get(key) and not policy.share_gpus:
                continue
            tightest = min(budgets.get(key, []) + ([req.step_budget] if req.step_budget
                                                   is not None else []), default=None)
            if tightest is None or streamed.get(key, 0) + req.step_bytes <= tightest:
                ok += 1
        return ok >= req.tp

    for d in demands:
        if d.spread == "none":
            continue
        mine = [a for a in plan.assignments if a.model == d.model]
        on_gpu: dict[tuple[str, int], int] = {}
        on_node: dict[str, int] = {}
        for a in mine:
            on_node[a.node] = on_node.get(a.node, 0) + 1
            for g in a.gpus:
                on_gpu[(a.node, g)] = on_gpu.get((a.node, g), 0) + 1
        if d.spread == "node":
            crowded = [a for a in mine if not a.existing and on_node[a.node] > 1]
            free = [n.name for n in snapshot.nodes if n.name not in on_node
                    and room(d, n, on_gpu)]
        else:
            crowded = [a for a in mine if not a.existing
                       and any(on_gpu[(a.node, g)] > 1 for g in a.gpus)]
            free = [n.name for n in snapshot.nodes if room(d, n, on_gpu)]
        assert not (crowded and free), (d.model, d.spread, crowded, free)
