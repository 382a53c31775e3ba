"""Tools around the product: the tiny random-weight model (tiny, tokenizer_build), the size and layout
planner's report (describe), the golden-data verification (verify, verification/)."""
