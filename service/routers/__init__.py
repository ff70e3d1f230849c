"""HTTP routes: thin (parse, authorise, call a plain function, map the result)."""
