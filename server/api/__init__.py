"""HTTP routes: parse, call one service, return."""
