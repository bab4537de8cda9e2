"""Pure graph checks shared by the proposer (clear errors early) and `apply` (the authority)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Return one dependency cycle among the keys of `edges` (node -> its dependencies), or None.

    Only edges between keys count: dependencies on nodes outside the mapping are existing
    tasks, which cannot depend on new ones, so they cannot close a cycle. Iterative DFS, so a
    10,000-task chain does not hit the recursion limit.
    """
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    for root in edges:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = grey
        while stack:
            node, i = stack[-1]
            deps = edges[node]
            if i < len(deps):
                stack[-1] = (node, i + 1)
                dep = deps[i]
                state = color.get(dep)
                if state is None or state == black:
                    continue
                if state == grey:
                    return path[path.index(dep):] + [dep]
                color[dep] = grey
                stack.append((dep, 0))
                path.append(dep)
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return None
