"""The command line: a thin layer that parses arguments and calls one library function per command."""
