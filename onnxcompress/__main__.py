"""``python -m onnxcompress``: the same command line as the ``onnxcompress`` script."""

from onnxcompress.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="onnxcompress")
