"""The findings rules, one module per family of what they judge; `registry` lists them."""
