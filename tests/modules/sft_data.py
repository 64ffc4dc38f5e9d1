"""The small supervised DialogSum data that the SFT tests train and predict on."""

from lit_rlhf.data import DialogSumDataModule


def supervised_data(model_name: str, batch_size: int = 16) -> DialogSumDataModule:
    # short dialogues and summaries keep each step fast; 2% of the kept rows are held out
    return DialogSumDataModule(model_name=model_name, with_labels=True, min_chars=200, max_chars=500,
                               test_size=0.02, max_prompt_tokens=128, max_summary_tokens=32,
                               batch_size=batch_size, eval_batch_size=16)


def batch_of(model_name: str, n: int = 4) -> dict:
    data = supervised_data(model_name, batch_size=n)
    data.setup("fit")
    return next(iter(data.val_dataloader()))
