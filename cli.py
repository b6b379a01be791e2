"""Run the `compress` command from a source checkout: `python cli.py run recipes/smollm2-w4g64.yaml`.

The command itself lives in compressor/cli.py so that it installs inside the package (the console
script `compress` points there); this file only makes the checkout runnable without installing.
"""

from compressor.cli import main

if __name__ == "__main__":
    main()
