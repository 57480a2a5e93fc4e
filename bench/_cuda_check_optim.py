"""Temporary CUDA smoke check: muonft optimizers on CUDA equal the CPU run (fp32 NS)."""
import sys, types
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muonft_cli.optim import build_optimizer

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 96)
        self.a = torch.nn.Linear(96, 200)
        self.b = torch.nn.Linear(200, 96)
        self.lora_A = torch.nn.Linear(96, 8, bias=False)
        self.lora_B = torch.nn.Linear(8, 300, bias=False)
        self.norm = torch.nn.LayerNorm(96)

def run(device, name):
    torch.manual_seed(0)
    m = Net().to(device)
    cfg = types.SimpleNamespace(name=name, lr=0.01, weight_decay=0.1, ns_dtype="fp32")
    opt = build_optimizer(m, cfg)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    opt.step()
    return {n: p.detach().cpu() for n, p in m.named_parameters()}, opt

for name in ["muon", "muon-pe", "adamuon", "normuon", "adamw"]:
    a, _ = run("cpu", name)
    b, opt = run("cuda", name)
    err = max(((a[n] - b[n]).abs().max() / a[n].abs().max()).item() for n in a)
    print(f"{name:8s} cuda-vs-cpu max rel err {err:.2e} ns_done={getattr(opt, 'ns_matrices_done', '-')}")
    assert err < 1e-3, name
print("CUDA check OK")
