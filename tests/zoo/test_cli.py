import argparse

import pytest

from questdiff.zoo import cli


def test_register_adds_zoo_subcommands():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "train", "fmnist-ldm", "--out", "runs/x", "--time-budget", "5", "--resume"])
    assert args.func is cli._train and args.time_budget == 5 and args.resume and args.vae is None
    assert parser.parse_args(["zoo", "list"]).func is cli._list
    with pytest.raises(SystemExit):
        parser.parse_args(["zoo", "train", "no-such-model", "--out", "x"])


def test_list_prints_every_model(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fmnist-ldm-cond", "fmnist-ldm", "mnist-ddpm", "fmnist-features"))
