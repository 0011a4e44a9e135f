"""Recipes: mergekit merge configs and multi-step surgery pipelines, reproducible and cached."""

from modelsurgery.recipe.runner import RecipeFailed, RecipeResult, RunOptions, plan_recipe, run_recipe

__all__ = ["RecipeFailed", "RecipeResult", "RunOptions", "plan_recipe", "run_recipe"]
