"""The demo trains, saves without blocking, 'crashes', restores and continues identically."""

from datarax_ckpt import demo


def test_demo_resumes_with_identical_losses(tmp_path, capsys):
    code = demo.main(
        [
            "--steps",
            "40",
            "--crash-at",
            "25",
            "--save-every",
            "10",
            "--width",
            "64",
            "--dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "resumed losses identical to the uninterrupted run: True" in out
    assert "steps on disk: [10, 20]; restored step 20" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-20", "ckpt-30", "ckpt-40"]
    assert f"datarax-ckpt ls {tmp_path}" in out  # where the checkpoints stay, how to look

    # The same --dir again: one line that says why, no traceback, nothing written.
    assert demo.main(["--steps", "40", "--dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "already holds checkpoints" in captured.err
