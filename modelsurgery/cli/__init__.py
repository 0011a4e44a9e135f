"""Command-line layer: parse options, call one library function, render its report."""
