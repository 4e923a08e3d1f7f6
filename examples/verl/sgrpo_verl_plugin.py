"""verl plugin for sentence-level GRPO. verl imports it in every process (driver and workers) when started with

    VERL_USE_EXTERNAL_MODULES=sgrpo_verl_plugin PYTHONPATH=examples/verl:$PYTHONPATH SGRPO_TOKENIZER=<model> \
        python -m verl.trainer.main_ppo ... (the config lines in examples/verl/README.md)

It registers the policy loss and the advantage estimator ``sentence_grpo`` (sentences from the tokenizer of the
trained model, ``SGRPO_TOKENIZER``) and a reward manager ``sentence`` that scores every sentence with a composite
reward and hands verl dense ``token_level_rewards`` (each sentence's reward on its last token).

A local verifier or process reward model joins the composite as one more term, named by ``SGRPO_STEP_SCORER``
(set it for every process, like ``SGRPO_TOKENIZER``) or by the manager's keyword ``step_scorer`` (for code that builds
the manager itself): ``KIND=FOLDER[,KEY=VALUE...]``, several separated by ``;``, the syntax of
``sgrpo train --step-scorer``, e.g. ``prm=/models/math-shepherd,weight=0.5`` or
``verifier=/models/judge,mode=one_pass,batch_size=8``. The scorer runs where the manager runs, on the device of its
model (the CPU as loaded).
"""

import os

from transformers import AutoTokenizer
from verl.workers.reward_manager import register as register_reward_manager
from verl.workers.reward_manager.abstract import AbstractRewardManager

from sgrpo_kernels import Segmenter
from sgrpo_kernels.integrations import verl as sgrpo_verl
from sgrpo_kernels.rewards import CompositeReward, FormatReward, MathStepCorrectness
from sgrpo_kernels.rewards.loading import with_step_scorers

segmenter = Segmenter(AutoTokenizer.from_pretrained(os.environ["SGRPO_TOKENIZER"]))
sgrpo_verl.register(loss="vanilla", level="sentence", segmenter=segmenter)


@register_reward_manager("sentence")
class SentenceRewardManager(AbstractRewardManager):
    """``reward_model.reward_manager=sentence``: 0.8 × step correctness + 0.2 × format, per sentence, with each
    step scorer's term added (``step_scorer`` or ``SGRPO_STEP_SCORER``)."""

    def __init__(self, tokenizer=None, num_examine=0, compute_score=None, reward_fn_key="data_source",
                 step_scorer=None, **_):
        reward = CompositeReward({"correct": MathStepCorrectness(), "format": FormatReward()},
                                 {"correct": 0.8, "format": 0.2})
        specs = step_scorer if step_scorer is not None else os.environ.get("SGRPO_STEP_SCORER", "")
        self.reward = with_step_scorers(reward, [spec for spec in specs.split(";") if spec])

    def __call__(self, data, return_dict=False):
        rewards = sgrpo_verl.sentence_reward_tensor(data, segmenter, self.reward)
        return {"reward_tensor": rewards, "reward_extra_info": {}} if return_dict else rewards
