"""The upstream-style flow, kept as a reference and a benchmark baseline.

For every region and every question it does what the authors' inference code does: preprocess and
encode the image again, build the full ~1100-token prompt with the image and region tokens, and
run the language model on all of it (``generate`` for free text; one full forward per candidate
answer for closed sets). Tests use it to prove the fast path gives the same answers and scores.
"""

from __future__ import annotations

import numpy as np
import torch

from osprey.model.modeling import OspreyModel
from osprey.model.preprocess import preprocess_image
from osprey.model.prompts import expand_image_placeholder

from .plan import GenerateTask, Question, ScoreTask, candidate_log_likelihood


class BaselineRunner:
    def __init__(
        self, *, model: OspreyModel, eos_token_id: int, pad_token_id: int, repetition_penalty: float = 1.0
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.repetition_penalty = repetition_penalty  # transformers' own, as the checkpoint configures it

    def _prompt_embeds(self, image: np.ndarray, mask: torch.Tensor, question: Question) -> torch.Tensor:
        model = self.model
        pixels = preprocess_image(image, image_size=model.config.vision.image_size)
        features, image_tokens = model.encode_pixels(pixels)
        mask_tokens, spatial_tokens = model.region_tokens(features, mask[None])
        ids = expand_image_placeholder(list(question.ids), image_tokens.shape[0])
        return model.embed(
            torch.tensor(ids, device=model.device),
            image_tokens=image_tokens,
            mask_tokens=mask_tokens,
            spatial_tokens=spatial_tokens,
        )

    @torch.inference_mode()
    def score(self, image: np.ndarray, masks: torch.Tensor, tasks: list[ScoreTask]) -> None:
        model = self.model
        for task in tasks:
            prompt = self._prompt_embeds(image, masks[task.region], task.question)
            for _, cand in task.candidates:
                cand_embeds = model.embed(torch.tensor(cand, device=model.device))
                embeds = torch.cat([prompt, cand_embeds])[None]
                logits = model.llm(inputs_embeds=embeds).logits[0].float()
                rows = logits[prompt.shape[0] - 1 : prompt.shape[0] - 1 + len(cand)]
                task.log_likelihoods.append(candidate_log_likelihood(rows.log_softmax(-1), cand))

    @torch.inference_mode()
    def generate(self, image: np.ndarray, masks: torch.Tensor, tasks: list[GenerateTask]) -> None:
        from transformers import GenerationConfig

        model = self.model
        for task in tasks:
            embeds = self._prompt_embeds(image, masks[task.region], task.question)[None]
            config = GenerationConfig(
                do_sample=False,
                num_beams=1,
                max_new_tokens=task.max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                repetition_penalty=self.repetition_penalty,
                output_logits=True,
                return_dict_in_generate=True,
            )
            out = model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device),
                generation_config=config,
            )
            task.token_ids = out.sequences[0].tolist()
            task.token_logprobs = [
                float(step[0].float().log_softmax(-1)[token])
                for step, token in zip(out.logits, task.token_ids, strict=True)
            ]
