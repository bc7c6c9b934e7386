"""The sample contract: what one I-FAS sample is, shared by the data pipeline and the model.

- ``tokenizer``: the tokenizers a run may use (a checkpoint's own, or the offline demo BPE) and their
  rules: "Yes" and "No" single tokens, an image placeholder, a chat template;
- ``prompt``: the fixed question in the checkpoint's chat format, the answer (judgment, then the
  interpretation) and its label groups (``PromptBuilder``, ``EncodedSample``);
- the label groups themselves (``IGNORE_INDEX``, ``UNSUPERVISED``, ``JUDGMENT``, ``INTERPRETATION``) are the
  loss kernels' (kernels/ stands alone, so they are defined there) and re-exported here.

``trainer.data`` turns shards into such samples and ``trainer.model`` computes on them; neither imports the
other (docs/architecture.md, "Data flow and dependency rules").
"""
from kernels import IGNORE_INDEX, INTERPRETATION, JUDGMENT, UNSUPERVISED

__all__ = ["IGNORE_INDEX", "INTERPRETATION", "JUDGMENT", "UNSUPERVISED"]
