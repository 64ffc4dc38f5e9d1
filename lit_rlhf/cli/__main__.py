"""``python -m lit_rlhf.cli``: the lit-rlhf command."""

from lit_rlhf.cli import main

if __name__ == "__main__":
    main()
