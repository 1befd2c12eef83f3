"""The ``tmass`` command: one click group, one sub-command (or group) per stage.

Each stage owns its commands in its own ``cli.py``; heavy imports (torch, open_clip,
decord) happen inside the commands so that ``tmass --help`` stays instant.
"""

import click

from tmass import __version__
from tmass.checkhead import check_head_command
from tmass.extract.cli import extract
from tmass.evaluate import split_metrics
from tmass.evaluate.cli import evaluate
from tmass.features.cli import features
from tmass.report import report
from tmass.search_cli import index, search
from tmass.sweep import ablate
from tmass.train.cli import EVALUATOR_KEY, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tmass")
@click.pass_context
def main(ctx):
    """T-MASS text-video retrieval on precomputed CLIP features.

    \b
    Typical loop, offline, on the rendered demo set and the shipped demo encoder
    (run from the repository root; `make help` lists the make targets):
      tmass extract --dataset demo --data-root data/demo --out features --model tmass-demo --pretrained extract/demo-encoder/tmass-demo.pt
      tmass train   --features features/demo/tmass-demo__tmass-demo --head tmass --lr 1e-4 --out runs/demo
      tmass eval    --features features/demo/tmass-demo__tmass-demo --checkpoint runs/demo/best.pt
    """
    ctx.meta[EVALUATOR_KEY] = split_metrics  # validation and test metrics of `tmass train`


main.add_command(features)
main.add_command(extract)
main.add_command(train)
main.add_command(evaluate)
main.add_command(ablate)
main.add_command(report)
main.add_command(check_head_command)
main.add_command(index)
main.add_command(search)
