"""Two CPU processes under torchrun (gloo), the README's recipe, since `accelerate launch --cpu` runs one."""

import json

import pytest
import torch

from conftest import RANK_PARAMETERS_SCRIPT, tiny_teacher, torchrun


@pytest.mark.slow
@pytest.mark.parametrize("cpu_flag", [["--cpu"], []], ids=["--cpu", "no flag on a machine without a GPU"])
def test_two_processes_finish_with_identical_parameters_on_every_rank(tmp_path, cpu_flag):
    # Without --cpu and without a GPU, torchrun's two processes still form one gloo run, never two independent
    # trainings writing one output folder.
    if not cpu_flag and torch.cuda.is_available():
        pytest.skip("the no-flag case is about machines without a GPU")
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    flags = ["--teacher", str(tmp_path / "teacher"), "--method", "sida", "--train_data", "digits", "--resolution", "8",
             "--train_batch_size", "4", "--total_batch_size", "16", "--warmup_kimg", "0", "--adversarial_start_kimg",
             "0.016", "--max_train_kimg", "0.048", "--checkpointing_kimg", "1", "--log_every_kimg", "0.016",
             "--lr", "1e-3", "--glr", "1e-3", "--sample_grid_size", "0", "--seed", "3", *cpu_flag, "--output_dir", str(out)]
    proc = torchrun(tmp_path, RANK_PARAMETERS_SCRIPT, *flags, timeout=240)
    assert "2 process(es) x B=4 x R=2 rounds = 16 images" in proc.stdout
    info = json.loads((out / "checkpoints" / "checkpoint-000000048" / "run_info.json").read_text())
    assert (info["num_processes"], info["total_batch_size"], info["cur_nimg"]) == (2, 16, 48)
    rank0, rank1 = (torch.load(out / f"params_rank{r}.pt") for r in (0, 1))
    initial = torch.cat([p.flatten() for p in tiny_teacher().parameters()])
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert not torch.equal(rank0["generator"], initial) and not torch.equal(rank0["fake_score"], initial)


K_STAR_SCRIPT = """
import json, sys, torch
from sida_diffusers.training import SiDATrainer, parse_args

class Recording(SiDATrainer):
    drawn = []

    def step(self):
        stage = super().step()
        self.drawn.append(self.k_star)
        return stage

trainer = Recording(parse_args(sys.argv[1:]))
trainer.train()
params = torch.cat([p.detach().flatten() for p in trainer.unwrap(trainer.generator).parameters()])
rank = trainer.accelerator.process_index
torch.save(params, f"{trainer.output_dir}/generator_rank{rank}.pt")
with open(f"{trainer.output_dir}/k_star_rank{rank}.json", "w") as f:
    json.dump(trainer.drawn, f)
"""


@pytest.mark.slow
def test_two_processes_train_the_same_k_star_sequence_of_a_four_step_generator(tmp_path):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    flags = ["--teacher", str(tmp_path / "teacher"), "--method", "sida", "--train_data", "digits", "--resolution", "8",
             "--train_batch_size", "4", "--total_batch_size", "8", "--warmup_kimg", "0", "--adversarial_start_kimg",
             "0", "--max_train_kimg", "0.064", "--checkpointing_kimg", "1", "--log_every_kimg", "0.016",
             "--num_steps", "4", "--step_sigmas", "karras", "--lr", "1e-3", "--glr", "1e-3", "--sample_grid_size", "0",
             "--seed", "3", "--cpu", "--output_dir", str(out)]
    torchrun(tmp_path, K_STAR_SCRIPT, *flags, timeout=240)
    drawn = [json.loads((out / f"k_star_rank{r}.json").read_text()) for r in (0, 1)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 8 and len(set(drawn[0])) > 1  # a real mixture, the same on both
    torch.testing.assert_close(torch.load(out / "generator_rank0.pt"), torch.load(out / "generator_rank1.pt"),
                               rtol=0, atol=0)
