"""mmtrain.data"""
