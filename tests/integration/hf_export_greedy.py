"""Greedy decoding of a checkpoint's Hugging Face export: vLLM against transformers.

    python hf_export_greedy.py CHECKPOINT_DIR OUT.json

Run in its own process so vLLM's engine and environment stay out of the test process.
Also compares the export's tensors with the learner's DeepSpeed state in the same
checkpoint (ZeRO-0 keeps the whole module in one file).
"""

import json
import os
import sys

PROMPTS = ["12+34=", "57+68=", "90+11=", "23+45=", "81+19=", "66+77="]
MAX_TOKENS = 16


def main(checkpoint_dir: str, out_path: str) -> None:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    hf_dir = os.path.join(checkpoint_dir, "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    llm = LLM(model=hf_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=128, seed=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0),
                           use_tqdm=False)
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outputs]

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokens, tie_margins = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            generated, margins = [], []
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([seq])).logits[0, -1]
                top = torch.topk(logits, 2)
                margins.append(float(top.values[0] - top.values[1]))
                token = int(top.indices[0])
                generated.append(token)
                if token == tokenizer.eos_token_id:
                    break
                seq.append(token)
            hf_tokens.append(generated)
            tie_margins.append(margins)

    exported = load_file(os.path.join(hf_dir, "model.safetensors"))
    states = torch.load(os.path.join(checkpoint_dir, "deepspeed", "state",
                                     "mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=False)["module"]
    export_matches = {name: bool(torch.equal(tensor, states[name])) for name, tensor in exported.items()}

    with open(out_path, "w") as handle:
        json.dump({"vllm": vllm_tokens, "hf": hf_tokens, "margins": tie_margins,
                   "export_matches_learner": export_matches}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
