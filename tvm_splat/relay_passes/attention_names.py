"""Name attention sites after the torch modules they come from.

``SparsifyAttention`` numbers sites by the index of their softmax (or ``nn.attention``) op
among all such ops of the function: ``attn0``, ``attn1``, ... The importer emits ops in
the order of the exported graph's nodes, so the k-th softmax/attention node of the
ExportedProgram (after the same decomposition the importer runs) is site k, and its
``nn_module_stack`` gives the module path (``"layers.1.attn"``).
"""
from __future__ import annotations

from typing import List

_SOFTMAX = ("aten._softmax", "aten.softmax")
_ATTENTION = ("aten.scaled_dot_product_attention",)


def _target_name(node) -> str:
    """``aten._softmax.default`` for OpOverloads (str() of the target)."""
    return str(node.target)


def attention_layer_names(exported_program, run_ep_decomposition: bool = True) -> List[str]:
    """Module path of every softmax/attention op, in site order, for ``names=``.

    ``exported_program``: a ``torch.export.ExportedProgram``; pass the same
    ``run_ep_decomposition`` as to ``from_exported_program``. A softmax outside any
    submodule is named ``"<root>"``; repeated paths get ``#1``, ``#2``, ... suffixes.
    """
    ep = exported_program.run_decompositions() if run_ep_decomposition else exported_program
    wanted = _SOFTMAX + (() if run_ep_decomposition else _ATTENTION)
    names, seen = [], {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not _target_name(node).startswith(wanted):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else "<root>"
        path = path or "<root>"
        count = seen.get(path, 0)
        seen[path] = count + 1
        names.append(path if count == 0 else f"{path}#{count}")
    return names
