"""Operations: pure functions from checkpoint(s) and typed options to tensors and a report."""
