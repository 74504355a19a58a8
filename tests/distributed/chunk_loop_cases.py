"""A chunk-loop model through ``optimize(world_size=P)`` (run on each rank of a Pool)."""
import torch
import torch.distributed as dist


class ChunkedPairTransition(torch.nn.Module):
    """LN -> up -> relu -> down on chunks of 3 rows of ``z [N_res, N_res, 8]`` along dim 1, concatenated."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, z):
        n = z.shape[1]
        return z + torch.cat([self.down(torch.relu(self.up(self.norm(z[:, i:i + 3])))) for i in range(0, n, 3)], dim=1)


def sharded_chunk_loop_case(rank: int):
    """The fusion record's chunk-loop entries on this rank, and the output against one process."""
    import foldcompile

    torch.manual_seed(0)
    model = ChunkedPairTransition().eval()
    z = torch.randn(7, 7, 8)
    fast = foldcompile.optimize(model, z, world_size=dist.get_world_size())
    with torch.no_grad():
        out, ref = fast(z), model(z)
    report = fast.report
    return (report.counts().get("chunk_loop"), [r["reason"] for r in report.rejections if r["rule"] == "chunk_loop"],
            (out - ref).abs().max().item())
