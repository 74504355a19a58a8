"""AlphaFold 2 (monomer), written plainly from the AlphaFold 2 supplementary information."""
from .evoformer import EvoformerBlock, EvoformerStack
from .extra_msa import ExtraMSAStack
from .model import AlphaFold2
from .structure_module import InvariantPointAttention, StructureModule
from .template import TemplatePairStack, TemplatePointwiseAttention

__all__ = ["AlphaFold2", "EvoformerBlock", "EvoformerStack", "ExtraMSAStack", "InvariantPointAttention",
           "StructureModule", "TemplatePairStack", "TemplatePointwiseAttention"]
