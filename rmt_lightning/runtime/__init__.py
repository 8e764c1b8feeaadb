"""What any layer may use: atomic writes, checkpoint input and output, distributed helpers, the precision check, and
``InputError`` with the small value checks."""
