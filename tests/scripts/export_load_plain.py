"""Load an exported merged folder with transformers alone: ds_bilevel cannot be imported here.

    python export_load_plain.py MODEL_DIR TOKEN_IDS_JSON TEXT

Prints one JSON line: the fp32 logits for the token ids, the tokenizer's ids for TEXT, and the
ds_bilevel modules that got imported (none).
"""

import importlib.abc
import json
import sys


class NoDsBilevel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "ds_bilevel":
            raise ImportError(f"{name}: ds_bilevel is not installed in this process")
        return None


def main(model_dir: str, token_ids: str, text: str) -> None:
    sys.meta_path.insert(0, NoDsBilevel())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor(json.loads(token_ids))).logits
    print(json.dumps({"logits": logits.tolist(), "ids": tokenizer(text).input_ids,
                      "ds_bilevel_modules": [m for m in sys.modules if m.startswith("ds_bilevel")]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
