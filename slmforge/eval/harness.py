"""lm-eval-harness adapter: any lm-eval task on an slmforge run, ``--model slmforge --model_args checkpoint=RUN``.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the registration below must run
in the process first. From the shell, ``python -m slmforge.eval.harness`` is the ``lm_eval`` command with
``slmforge`` registered:

    python -m slmforge.eval.harness --model slmforge --model_args checkpoint=runs/tiny --tasks arc_easy

and from Python ``import slmforge.eval.harness`` before ``lm_eval.simple_evaluate(model="slmforge", ...)``.

Requests: ``loglikelihood`` scores continuation tokens (right-padded batches, longest first; a context longer
than ``max_length`` keeps its end), ``loglikelihood_rolling`` sums disjoint windows of ``max_length`` tokens
(lm-eval's ``get_rolling_token_windows``), ``generate_until`` runs ``generate_batch`` with lm-eval's stop and
length handling. Contexts start with EOS, the document boundary the model saw in training (rolling windows
use it as their prefix token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from slmforge.checkpoint import load_for_inference
from slmforge.eval.gsm8k import context_ids
from slmforge.progress import progress_bar
from slmforge.serve.generate import generate_batch


@register_model("slmforge")
class SlmforgeLM(TemplateLM):
    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str | None = 8,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 1234):
        super().__init__()
        # lm-eval's CLI passes --device (default "cuda"); like its HF model, fall back to the CPU.
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer, _ = load_for_inference(checkpoint, device=device)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else int(max_batch_size or 8)  # "auto"
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return "slmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_ids, continuation_ids = super()._encode_pair(context, continuation)
        return [self.eot_token_id] + context_ids, continuation_ids

    # ------------------------------------------------------------------ log-likelihoods

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log p(continuation), greedy?)."""
        # (input ids, number of scored tokens at the end): the last token is never an input.
        rows = []
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length}")
            ids = (ctx + cont)[-(self.max_length + 1):]
            rows.append((ids[:-1], ids[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in progress_bar(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            # Right padding: a causal model's logits at real positions never see it.
            inputs = torch.tensor([rows[i][0] + [0] * (width - len(rows[i][0])) for i in batch], device=self._device)
            logits, _ = self.model(inputs)  # (B, T, V)
            for b, i in enumerate(batch):
                n, targets, num = len(rows[i][0]), rows[i][1], rows[i][2]
                logp = F.log_softmax(logits[b, n - num : n].float(), dim=-1)  # (num, V)
                cont = torch.tensor(targets[-num:], device=self._device)
                total = logp.gather(1, cont[:, None]).sum().item()
                out[i] = (total, bool((logp.argmax(-1) == cont).all()))
                if requests[i][0][0] is not None:  # rolling windows are cached whole, below
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, request in enumerate(requests):
            ids = self.tok_encode(request.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special=False)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings run together
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = progress_bar(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            ids = {i: context_ids(self.tokenizer, requests[i].args[0], self.max_length, new_tokens) for i in members}
            members = sorted(members, key=lambda i: -len(ids[i]))

            def stopped(new: list[int]) -> bool:
                text = self.tokenizer.decode(new)
                return any(s in text for s in until if s)

            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                new = generate_batch(self.model, [ids[i] for i in batch], new_tokens, eos_id=self.eot_token_id,
                                     temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                     top_p=float(kwargs.get("top_p") or 1.0), generator=self.generator, stop=stopped)
                for i, row in zip(batch, new):
                    out[i] = postprocess_generated_text(self.tokenizer.decode(row), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out


def main() -> None:
    """The ``lm_eval`` command line, with the ``slmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
