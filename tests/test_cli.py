"""The `tokprune` console script: dispatch, help, errors, and a tiny end-to-end `bench-select`."""
import json
import os
import subprocess
import sys

import pytest

from tokprune_nb.apps.cli import SUBCOMMANDS, main


def run(*args):
    exe = os.path.join(os.path.dirname(sys.executable), 'tokprune')
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    r = run('--help')
    assert r.returncode == 0
    for name in SUBCOMMANDS:
        assert name in r.stdout


def test_unknown_command_is_an_error():
    r = run('frobnicate')
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize('name', sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name):
    with pytest.raises(SystemExit) as e:   # argparse exits 0 after printing help
        main([name, '--help'])
    assert e.value.code == 0


def test_bench_select_end_to_end(tmp_path):
    out = tmp_path / 'sel.json'
    r = run('bench-select', '--n-tokens', '64', '--dim', '32', '--keep', '0.25', '--batch', '1,2',
            '--policies', 'zspaprune,divprune', '--repeats', '1', '--json', str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data) == {'machine', 'records'} and len(data['records']) == 4
    rec = data['records'][0]
    assert {'policy', 'n_tokens', 'keep', 'kept', 'batch', 'ms_per_image'} <= set(rec) and rec['kept'] == 16
