"""Write tests/fixtures/compvis/bert_embedder_tiny.json from the ORIGINAL x-transformer code.

No package carries Collaborative Diffusion's `ldm/modules/x_transformer.py` (the CompVis copy of an early
lucidrains x-transformers), so the test of facelab's BERTEmbedder checks against this fixture: the original
TransformerWrapper(Encoder) at a tiny size, its state-dict key names and shapes under `cond_stage_model.transformer.`
(as BERTEmbedder nests it in an LDM checkpoint), token ids, and its embeddings for weights drawn in a documented way
(`fixture_weights` in tests/test_convert_compvis.py: sorted keys, one seeded generator) that the test redraws.

    python experiments/convert_compvis/make_bert_fixture.py PATH/TO/Collaborative-Diffusion/ldm/modules/x_transformer.py
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_compvis import BERT_FIXTURE, fixture_weights  # noqa: E402

TINY = {"num_tokens": 40, "max_seq_len": 10, "dim": 32, "depth": 2}  # heads 8, dim_head 64: the original's defaults


def main(source: str) -> None:
    spec = importlib.util.spec_from_file_location("x_transformer", source)
    xt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xt)
    model = xt.TransformerWrapper(num_tokens=TINY["num_tokens"], max_seq_len=TINY["max_seq_len"],
                                  attn_layers=xt.Encoder(dim=TINY["dim"], depth=TINY["depth"])).eval()
    prefix = "cond_stage_model.transformer."
    shapes = {prefix + k: list(v.shape) for k, v in model.state_dict().items()}
    weights = fixture_weights(shapes)
    model.load_state_dict({k[len(prefix):]: v for k, v in weights.items()})
    ids = torch.randint(0, TINY["num_tokens"], (2, TINY["max_seq_len"]), generator=torch.Generator().manual_seed(1))
    ids[1, 6:] = 0  # padding, which the original attends to
    with torch.no_grad():
        out = model(ids, return_embeddings=True)
    BERT_FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    BERT_FIXTURE.write_text(json.dumps({
        "source": "Collaborative-Diffusion ldm/modules/x_transformer.py: TransformerWrapper(num_tokens=40, "
                  "max_seq_len=10, attn_layers=Encoder(dim=32, depth=2)), forward(ids, return_embeddings=True)",
        "config": TINY, "shapes": shapes, "ids": ids.tolist(), "output": out.tolist()}) + "\n")
    print(f"wrote {BERT_FIXTURE} ({len(shapes)} tensors, output {list(out.shape)})")


if __name__ == "__main__":
    main(sys.argv[1])
