"""ComfyUI glue: thin node classes, one module per technique. No math here (see attention/, training/)."""
from .comfy_io import ComfyExtension, io
from .detex import DETEX_NODES
from .disendiff import DISENDIFF_NODES
from .pva import PVA_NODES
from .pva_training import PVA_TRAINING_NODES
from .realcustom import REALCUSTOM_NODES
from .realcustom_trainer import REALCUSTOM_TRAINER_NODES
from .style_aligned import STYLE_ALIGNED_NODES
from .validation import guard_nodes

#: every node the pack registers, each guarded once (nodes/validation.py guard_nodes)
NODES = guard_nodes([*STYLE_ALIGNED_NODES, *REALCUSTOM_NODES, *REALCUSTOM_TRAINER_NODES, *PVA_NODES, *PVA_TRAINING_NODES,
                     *DISENDIFF_NODES, *DETEX_NODES])


class PersonalizationExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
