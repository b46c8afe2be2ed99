"""mmtrain.eval"""
