"""The compact model (numpy only): its structure, its ops and their reference executor."""

from mann_edge.graph.executor import Executor, normalize_inputs
from mann_edge.graph.model import CompactModel, Node, Task, TensorSpec
from mann_edge.graph.ops import OPS, Op, bind, register

__all__ = ["CompactModel", "Node", "Task", "TensorSpec", "Op", "OPS", "register", "bind", "Executor", "normalize_inputs"]
